//! The `bitnode` binary: everything is in the library's `cli` module, so the command line, the daemon and
//! the tests share one build of the code.
fn main() {
    bitnode::cli::main();
}
