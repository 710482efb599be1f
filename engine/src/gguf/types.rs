//! ggml tensor types: ids, block sizes and byte sizes (ggml `type_traits`; checked against gguf-py 0.19's
//! `GGML_QUANT_SIZES`, except Q8_1, whose entry there is stale and which no model file holds).
//!
//! The reader needs the size of every type it may meet, not only of those bitnode decodes, to check that
//! each tensor's data lies where the spec says; types bitnode cannot decode are refused later, by the
//! decoder, with the tensor's name.

/// A ggml tensor type as stored in a tensor info.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    IQ2XXS,
    IQ2XS,
    IQ3XXS,
    IQ1S,
    IQ4NL,
    IQ3S,
    IQ2S,
    IQ4XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1M,
    BF16,
    TQ1_0,
    TQ2_0,
    /// bitnet.cpp's 2-bit ternary type (id 36 in bitnet.cpp files only; see [`GgmlType::from_id`]).
    I2S,
    /// Upstream ggml's id 39 (outside bitnet.cpp files).
    MXFP4,
    NVFP4,
    Q1_0,
}

/// bitnet.cpp's `LLAMA_FTYPE_MOSTLY_I2_S`: the `general.file_type` of its official I2_S file.
pub const FTYPE_I2_S: u32 = 40;

/// Elements of an I2_S packing block: 32 bytes hold 4 groups of 32 codes (see `decode::i2s_to_ternary`).
pub const I2S_BLOCK: u64 = 128;

impl GgmlType {
    /// The type of id `id`. Ids 36..39 mean different things in bitnet.cpp's fork of ggml and upstream
    /// (36 is I2_S there and a removed repacked type upstream; 39 is TL2 there and MXFP4 upstream), so the
    /// caller says whether the file comes from bitnet.cpp. `Err(Some(reason))` is a type known but not
    /// supported, `Err(None)` an unknown id.
    pub fn from_id(id: u32, bitnet_cpp: bool) -> Result<GgmlType, Option<&'static str>> {
        use GgmlType::*;
        Ok(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            4 | 5 => return Err(Some("Q4_2/Q4_3 were removed from ggml")),
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => {
                return Err(Some(
                    "Q8_1 is ggml's intermediate type for activations, not stored in model files",
                ))
            }
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            16 => IQ2XXS,
            17 => IQ2XS,
            18 => IQ3XXS,
            19 => IQ1S,
            20 => IQ4NL,
            21 => IQ3S,
            22 => IQ2S,
            23 => IQ4XS,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => IQ1M,
            30 => BF16,
            31..=33 => {
                return Err(Some(
                    "the Q4_0_4_4/Q4_0_4_8/Q4_0_8_8 repacked types were removed from ggml",
                ))
            }
            34 => TQ1_0,
            35 => TQ2_0,
            36 if bitnet_cpp => I2S,
            36 => {
                return Err(Some(
                    "36 is I2_S only in bitnet.cpp files (general.file_type 40 or a bitnet-* architecture); \
                     upstream it is the removed IQ4_NL_4_4",
                ))
            }
            37 if bitnet_cpp => return Err(Some("bitnet.cpp's I8_S holds activations, not weights")),
            38 if bitnet_cpp => {
                return Err(Some(
                    "bitnet.cpp's TL1 is tiled for one machine's lookup-table kernels; convert to I2_S or TQ2_0",
                ))
            }
            39 if bitnet_cpp => {
                return Err(Some(
                    "bitnet.cpp's TL2 is tiled for one machine's lookup-table kernels; convert to I2_S or TQ2_0",
                ))
            }
            37 | 38 => return Err(Some("the IQ4_NL_4_8/IQ4_NL_8_8 repacked types were removed from ggml")),
            39 => MXFP4,
            40 => NVFP4,
            41 => Q1_0,
            _ => return Err(None),
        })
    }

    /// Elements per block along ne[0] (I2_S packs the flattened tensor instead; see [`GgmlType::nbytes`]).
    pub fn block_size(self) -> u64 {
        use GgmlType::*;
        match self {
            F32 | F16 | I8 | I16 | I32 | I64 | F64 | BF16 | I2S => 1,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | IQ4NL | MXFP4 => 32,
            NVFP4 => 64,
            Q1_0 => 128,
            Q2K | Q3K | Q4K | Q5K | Q6K | Q8K | IQ2XXS | IQ2XS | IQ3XXS | IQ1S | IQ3S | IQ2S | IQ4XS | IQ1M | TQ1_0
            | TQ2_0 => 256,
        }
    }

    /// Bytes per block (not meaningful for I2_S, whose size is not per block).
    pub fn type_size(self) -> u64 {
        use GgmlType::*;
        match self {
            F32 => 4,
            F16 => 2,
            Q4_0 => 18,
            Q4_1 => 20,
            Q5_0 => 22,
            Q5_1 => 24,
            Q8_0 => 34,
            Q2K => 84,
            Q3K => 110,
            Q4K => 144,
            Q5K => 176,
            Q6K => 210,
            Q8K => 292,
            IQ2XXS => 66,
            IQ2XS => 74,
            IQ3XXS => 98,
            IQ1S => 50,
            IQ4NL => 18,
            IQ3S => 110,
            IQ2S => 82,
            IQ4XS => 136,
            I8 => 1,
            I16 => 2,
            I32 => 4,
            I64 => 8,
            F64 => 8,
            IQ1M => 56,
            BF16 => 2,
            TQ1_0 => 54,
            TQ2_0 => 66,
            I2S => 1,
            MXFP4 => 17,
            NVFP4 => 36,
            Q1_0 => 18,
        }
    }

    /// The data size of `n` elements whose ne[0] is a multiple of the block size, or `None` on overflow.
    /// I2_S is bitnet.cpp's special case (`ggml_nbytes`): n/4 bytes of codes, then a float32 scale padded to
    /// 32 bytes; the generic formula (its traits claim 1 byte per element) would say n.
    pub fn nbytes(self, n: u64) -> Option<u64> {
        match self {
            GgmlType::I2S => (n / 4).checked_add(32),
            t => (n / t.block_size()).checked_mul(t.type_size()),
        }
    }

    /// The name ggml and gguf-py print.
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q2K => "Q2_K",
            Q3K => "Q3_K",
            Q4K => "Q4_K",
            Q5K => "Q5_K",
            Q6K => "Q6_K",
            Q8K => "Q8_K",
            IQ2XXS => "IQ2_XXS",
            IQ2XS => "IQ2_XS",
            IQ3XXS => "IQ3_XXS",
            IQ1S => "IQ1_S",
            IQ4NL => "IQ4_NL",
            IQ3S => "IQ3_S",
            IQ2S => "IQ2_S",
            IQ4XS => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            IQ1M => "IQ1_M",
            BF16 => "BF16",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
            I2S => "I2_S",
            MXFP4 => "MXFP4",
            NVFP4 => "NVFP4",
            Q1_0 => "Q1_0",
        }
    }

    /// The id written in tensor infos.
    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q2K => 10,
            Q3K => 11,
            Q4K => 12,
            Q5K => 13,
            Q6K => 14,
            Q8K => 15,
            IQ2XXS => 16,
            IQ2XS => 17,
            IQ3XXS => 18,
            IQ1S => 19,
            IQ4NL => 20,
            IQ3S => 21,
            IQ2S => 22,
            IQ4XS => 23,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            IQ1M => 29,
            BF16 => 30,
            TQ1_0 => 34,
            TQ2_0 => 35,
            I2S => 36,
            MXFP4 => 39,
            NVFP4 => 40,
            Q1_0 => 41,
        }
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn ids_round_trip() {
        for id in 0..64 {
            if let Ok(t) = GgmlType::from_id(id, id == 36) {
                assert_eq!(t.id(), id, "{t}");
            }
        }
        assert!(GgmlType::from_id(36, false).is_err());
        assert_eq!(GgmlType::from_id(39, false), Ok(GgmlType::MXFP4));
        assert!(matches!(GgmlType::from_id(39, true), Err(Some(_))));
        assert_eq!(GgmlType::from_id(1000, false), Err(None));
    }
}
