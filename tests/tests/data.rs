//! Training data: packing, prompt masking, chat templates (against transformers' apply_chat_template in
//! tokenizer_cases.json), shuffling, validation split, and clear errors naming file and line.
use bitnode_engine::data::{self, DataSpec, Message};
use bitnode_engine::tokenizer::Tokenizer;
use bitnode_engine::train::IGNORE;
use bitnode_tests::{fixtures, tempdir};
use serde_json::Value;

fn spec(tok: &Tokenizer, seq_len: usize) -> DataSpec<'_> {
    DataSpec::for_model(&fixtures().join("online_tied"), tok, 396, seq_len)
}

fn write(name: &str, text: &str) -> std::path::PathBuf {
    let p = tempdir(&format!("data-{name}")).join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn chat_template_matches_transformers_and_masks_all_but_assistant_turns() {
    let tok = Tokenizer::load(&fixtures().join("online_tied")).unwrap();
    let s = spec(&tok, 256);
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tokenizer_cases.json")).unwrap()).unwrap();
    for case in cases["chat_cases"].as_array().unwrap() {
        let msgs: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let text = data::render(&s, &msgs, gen).unwrap();
        assert_eq!(text, case["rendered"].as_str().unwrap());
        let ids: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode_plain(&text).unwrap(), ids);
    }
    // Loss on the assistant turn only: its content and its end-of-turn token.
    let msgs: Vec<Message> = serde_json::from_value(cases["chat_cases"][1]["messages"].clone()).unwrap();
    let ex = data::chat(&s, &msgs).unwrap();
    let labelled: Vec<u32> = ex.labels.iter().filter(|&&l| l != IGNORE).map(|&l| l as u32).collect();
    assert_eq!(tok.decode(&labelled).unwrap(), "There are 12 boats.");
    assert_eq!(*labelled.last().unwrap(), tok.token_id("<|eot_id|>").unwrap());
    // The built-in Llama-3 template gives the same rendering when a model ships none.
    let mut plain = spec(&tok, 256);
    plain.chat_template = None;
    assert_eq!(
        data::render(&plain, &msgs, false).unwrap(),
        data::render(&s, &msgs, false).unwrap()
    );
}

#[test]
fn text_is_packed_and_prompts_are_masked() {
    let tok = Tokenizer::load(&fixtures().join("online_tied")).unwrap();
    let text = "The river runs past the old mill at the edge of the town. ".repeat(8);
    let p = write("doc.txt", &text);
    let ex = data::load(&p, &spec(&tok, 16)).unwrap();
    let mut stream = tok.encode(&text).unwrap();
    stream.push(396);
    assert_eq!(ex.len(), stream.len() / 16, "consecutive chunks, remainder dropped");
    let flat: Vec<u32> = ex.iter().flat_map(|e| e.ids.clone()).collect();
    assert_eq!(flat, stream[..flat.len()]);
    assert!(ex
        .iter()
        .all(|e| e.labels.iter().zip(&e.ids).all(|(l, i)| *l == *i as i32)));

    let j = write(
        "mix.jsonl",
        "{\"prompt\": \"Where is the mill?\", \"completion\": \" By the river.\"}\n\n{\"text\": \"A heron waits by the bridge. A heron waits by the bridge. A heron waits.\"}\n",
    );
    let ex = data::load(&j, &spec(&tok, 32)).unwrap();
    let pc = &ex[0];
    let np = tok.encode("Where is the mill?").unwrap().len();
    assert!(pc.labels[..np].iter().all(|&l| l == IGNORE));
    assert!(pc.labels[np..].iter().all(|&l| l != IGNORE));
    assert_eq!(*pc.ids.last().unwrap(), 396, "completion ends with EOS");
    assert!(!ex.is_empty());

    let order = data::shuffled(10, 7);
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(sorted, (0..10).collect::<Vec<_>>());
    assert_eq!(order, data::shuffled(10, 7));
    assert_ne!(order, data::shuffled(10, 8));
    let (tr, va) = data::split(data::load(&p, &spec(&tok, 8)).unwrap(), 0.25).unwrap();
    assert!(!tr.is_empty() && !va.is_empty());
}

#[test]
fn bad_datasets_fail_with_file_and_line() {
    let tok = Tokenizer::load(&fixtures().join("online_tied")).unwrap();
    let s = spec(&tok, 16);
    let e = |name: &str, body: &str| data::load(&write(name, body), &s).unwrap_err().to_string();
    assert!(e("empty.jsonl", "\n \n").contains("empty"));
    let m = e("bad.jsonl", "{\"text\": \"fine text here for a while\"}\n{not json}\n");
    assert!(m.contains("bad.jsonl:2") && m.contains("not valid JSON"), "{m}");
    let m = e(
        "noasst.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
    );
    assert!(m.contains(":1") && m.contains("no assistant turn"), "{m}");
    let long = "word ".repeat(40);
    let m = e(
        "long.jsonl",
        &format!("{{\"prompt\": \"q\", \"completion\": \"{long}\"}}\n"),
    );
    assert!(m.contains("longer than --seq-len"), "{m}");
    let m = e("keys.jsonl", "{\"question\": \"q\"}\n");
    assert!(m.contains("expected {\"text\"}"), "{m}");
    let m = e("short.txt", "hi");
    assert!(m.contains("fewer than one sequence"), "{m}");
    let m = e("types.jsonl", "{\"messages\": \"hello\"}\n");
    assert!(m.contains("must be a list"), "{m}");
    assert!(data::split(vec![], 0.5).is_err());
}
