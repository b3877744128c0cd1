//! Instruction encoding for Rust callers (unit tests, benches): the same bytes the Python
//! assembler produces, without a text syntax.

use super::isa::{op, INSN_SIZE};

/// One 8-byte instruction: opcode, register field a, register field b, imm32.
pub fn insn(opcode: u8, a: usize, b: usize, imm: i32) -> [u8; 8] {
    assert!(a < 16 && b < 16, "register fields are 0..15, got a={a} b={b}");
    let mut out = [0u8; 8];
    out[0] = opcode;
    out[1] = a as u8;
    out[2] = b as u8;
    out[4..8].copy_from_slice(&imm.to_le_bytes());
    out
}

/// A program built from instructions, with branch offsets computed from instruction indices.
#[derive(Default)]
pub struct Builder {
    pub code: Vec<u8>,
}

impl Builder {
    pub fn new() -> Builder {
        Builder::default()
    }
    /// Offset of the next instruction from the start of the program.
    pub fn here(&self) -> u64 {
        self.code.len() as u64
    }
    pub fn emit(&mut self, opcode: u8, a: usize, b: usize, imm: i32) -> &mut Builder {
        self.code.extend_from_slice(&insn(opcode, a, b, imm));
        self
    }
    pub fn movabs(&mut self, a: usize, value: u64) -> &mut Builder {
        self.emit(op::MOVABS, a, 0, 0);
        self.code.extend_from_slice(&value.to_le_bytes());
        self
    }
    /// A relative branch/call to the program offset `target`.
    pub fn branch(&mut self, opcode: u8, target: u64) -> &mut Builder {
        let next = self.here() + INSN_SIZE;
        let rel = target as i64 - next as i64;
        self.emit(opcode, 0, 0, i32::try_from(rel).expect("branch within ±2 GiB"))
    }
    pub fn raw(&mut self, bytes: &[u8]) -> &mut Builder {
        self.code.extend_from_slice(bytes);
        self
    }
}
