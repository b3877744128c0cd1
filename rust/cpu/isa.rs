//! The simulated ISA's numbers: opcodes, register numbers, rflags bits, MSR indices, control
//! register numbers. docs/isa.md is the prose contract; this file is the same table in code, and
//! the Python assembler checks its own table against `MNEMONICS` through the bindings.

/// Size of every instruction except `movabs`, which is twice this.
pub const INSN_SIZE: u64 = 8;
/// Size of `movabs` (an 8-byte header followed by the 64-bit immediate).
pub const MOVABS_SIZE: u64 = 16;

/// Bits of the instruction word that must be zero: the high nibbles of the two register fields
/// and the whole of byte 3. A set bit faults with `FaultKind::ReservedBits`.
pub const RESERVED_MASK: u64 = 0xFFF0_F000;

/// Opcodes (byte 0 of the instruction word).
pub mod op {
    // 0x00 is deliberately invalid: running into zeroed memory faults at once.
    pub const NOP: u8 = 0x01;
    pub const HLT: u8 = 0x02;
    pub const PAUSE: u8 = 0x03;
    pub const CLI: u8 = 0x04;
    pub const STI: u8 = 0x05;
    pub const IRET: u8 = 0x06;
    pub const RET: u8 = 0x07;
    pub const RDTSC: u8 = 0x08;
    pub const RDTSCP: u8 = 0x09;
    pub const RDMSR: u8 = 0x0A;
    pub const WRMSR: u8 = 0x0B;
    pub const LIDT: u8 = 0x0C;
    pub const SIDT: u8 = 0x0D;
    pub const MOV_TO_CR: u8 = 0x0E;
    pub const MOV_FROM_CR: u8 = 0x0F;

    pub const MOV: u8 = 0x10;
    pub const MOVI: u8 = 0x11;
    pub const MOVABS: u8 = 0x12;
    pub const LEA: u8 = 0x13;
    pub const PUSH: u8 = 0x14;
    pub const POP: u8 = 0x15;
    pub const CALL: u8 = 0x17;
    pub const CALLR: u8 = 0x18;
    pub const JMP: u8 = 0x19;
    pub const JMPR: u8 = 0x1A;

    // Two-operand ALU, register source; the immediate form is the same opcode + IMM_FORM.
    pub const ADD: u8 = 0x20;
    pub const SUB: u8 = 0x21;
    pub const AND: u8 = 0x22;
    pub const OR: u8 = 0x23;
    pub const XOR: u8 = 0x24;
    pub const SHL: u8 = 0x25;
    pub const SHR: u8 = 0x26;
    pub const SAR: u8 = 0x27;
    pub const MUL: u8 = 0x28;
    pub const DIV: u8 = 0x29;
    pub const REM: u8 = 0x2A;
    pub const IDIV: u8 = 0x2B;
    pub const IREM: u8 = 0x2C;
    pub const CMP: u8 = 0x2D;
    pub const TEST: u8 = 0x2E;
    pub const IMM_FORM: u8 = 0x10;
    pub const ADDI: u8 = ADD + IMM_FORM;
    pub const SUBI: u8 = SUB + IMM_FORM;
    pub const ANDI: u8 = AND + IMM_FORM;
    pub const ORI: u8 = OR + IMM_FORM;
    pub const XORI: u8 = XOR + IMM_FORM;
    pub const SHLI: u8 = SHL + IMM_FORM;
    pub const SHRI: u8 = SHR + IMM_FORM;
    pub const SARI: u8 = SAR + IMM_FORM;
    pub const MULI: u8 = MUL + IMM_FORM;
    pub const DIVI: u8 = DIV + IMM_FORM;
    pub const REMI: u8 = REM + IMM_FORM;
    pub const IDIVI: u8 = IDIV + IMM_FORM;
    pub const IREMI: u8 = IREM + IMM_FORM;
    pub const CMPI: u8 = CMP + IMM_FORM;
    pub const TESTI: u8 = TEST + IMM_FORM;

    pub const INC: u8 = 0x40;
    pub const DEC: u8 = 0x41;
    pub const NEG: u8 = 0x42;
    pub const NOT: u8 = 0x43;

    pub const JE: u8 = 0x50;
    pub const JNE: u8 = 0x51;
    pub const JL: u8 = 0x52;
    pub const JLE: u8 = 0x53;
    pub const JG: u8 = 0x54;
    pub const JGE: u8 = 0x55;
    pub const JB: u8 = 0x56;
    pub const JBE: u8 = 0x57;
    pub const JA: u8 = 0x58;
    pub const JAE: u8 = 0x59;
    pub const JS: u8 = 0x5A;
    pub const JNS: u8 = 0x5B;
    pub const JO: u8 = 0x5C;
    pub const JNO: u8 = 0x5D;

    pub const LD8: u8 = 0x60;
    pub const LD16: u8 = 0x61;
    pub const LD32: u8 = 0x62;
    pub const LD64: u8 = 0x63;
    pub const ST8: u8 = 0x68;
    pub const ST16: u8 = 0x69;
    pub const ST32: u8 = 0x6A;
    pub const ST64: u8 = 0x6B;

    pub const IN8: u8 = 0x70;
    pub const IN16: u8 = 0x71;
    pub const IN32: u8 = 0x72;
    pub const IN8R: u8 = 0x74;
    pub const IN16R: u8 = 0x75;
    pub const IN32R: u8 = 0x76;
    pub const OUT8: u8 = 0x78;
    pub const OUT16: u8 = 0x79;
    pub const OUT32: u8 = 0x7A;
    pub const OUT8R: u8 = 0x7C;
    pub const OUT16R: u8 = 0x7D;
    pub const OUT32R: u8 = 0x7E;
}

/// Every opcode with its mnemonic as docs/isa.md spells it (register-port I/O forms share the
/// mnemonic of the immediate-port form; the operand says which).
pub const MNEMONICS: &[(u8, &str)] = &[
    (op::NOP, "nop"),
    (op::HLT, "hlt"),
    (op::PAUSE, "pause"),
    (op::CLI, "cli"),
    (op::STI, "sti"),
    (op::IRET, "iret"),
    (op::RET, "ret"),
    (op::RDTSC, "rdtsc"),
    (op::RDTSCP, "rdtscp"),
    (op::RDMSR, "rdmsr"),
    (op::WRMSR, "wrmsr"),
    (op::LIDT, "lidt"),
    (op::SIDT, "sidt"),
    (op::MOV_TO_CR, "mov cr, reg"),
    (op::MOV_FROM_CR, "mov reg, cr"),
    (op::MOV, "mov reg, reg"),
    (op::MOVI, "mov reg, imm"),
    (op::MOVABS, "movabs"),
    (op::LEA, "lea"),
    (op::PUSH, "push"),
    (op::POP, "pop"),
    (op::CALL, "call rel"),
    (op::CALLR, "call reg"),
    (op::JMP, "jmp rel"),
    (op::JMPR, "jmp reg"),
    (op::ADD, "add"),
    (op::SUB, "sub"),
    (op::AND, "and"),
    (op::OR, "or"),
    (op::XOR, "xor"),
    (op::SHL, "shl"),
    (op::SHR, "shr"),
    (op::SAR, "sar"),
    (op::MUL, "mul"),
    (op::DIV, "div"),
    (op::REM, "rem"),
    (op::IDIV, "idiv"),
    (op::IREM, "irem"),
    (op::CMP, "cmp"),
    (op::TEST, "test"),
    (op::ADDI, "add imm"),
    (op::SUBI, "sub imm"),
    (op::ANDI, "and imm"),
    (op::ORI, "or imm"),
    (op::XORI, "xor imm"),
    (op::SHLI, "shl imm"),
    (op::SHRI, "shr imm"),
    (op::SARI, "sar imm"),
    (op::MULI, "mul imm"),
    (op::DIVI, "div imm"),
    (op::REMI, "rem imm"),
    (op::IDIVI, "idiv imm"),
    (op::IREMI, "irem imm"),
    (op::CMPI, "cmp imm"),
    (op::TESTI, "test imm"),
    (op::INC, "inc"),
    (op::DEC, "dec"),
    (op::NEG, "neg"),
    (op::NOT, "not"),
    (op::JE, "je"),
    (op::JNE, "jne"),
    (op::JL, "jl"),
    (op::JLE, "jle"),
    (op::JG, "jg"),
    (op::JGE, "jge"),
    (op::JB, "jb"),
    (op::JBE, "jbe"),
    (op::JA, "ja"),
    (op::JAE, "jae"),
    (op::JS, "js"),
    (op::JNS, "jns"),
    (op::JO, "jo"),
    (op::JNO, "jno"),
    (op::LD8, "ld8"),
    (op::LD16, "ld16"),
    (op::LD32, "ld32"),
    (op::LD64, "ld64"),
    (op::ST8, "st8"),
    (op::ST16, "st16"),
    (op::ST32, "st32"),
    (op::ST64, "st64"),
    (op::IN8, "in8 imm"),
    (op::IN16, "in16 imm"),
    (op::IN32, "in32 imm"),
    (op::IN8R, "in8 reg"),
    (op::IN16R, "in16 reg"),
    (op::IN32R, "in32 reg"),
    (op::OUT8, "out8 imm"),
    (op::OUT16, "out16 imm"),
    (op::OUT32, "out32 imm"),
    (op::OUT8R, "out8 reg"),
    (op::OUT16R, "out16 reg"),
    (op::OUT32R, "out32 reg"),
];

/// General registers in amd64 encoding order.
pub const GPR_NAMES: [&str; 16] =
    ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"];

pub const RAX: usize = 0;
pub const RCX: usize = 1;
pub const RDX: usize = 2;
pub const RSP: usize = 4;

pub fn gpr_number(name: &str) -> Option<usize> {
    GPR_NAMES.iter().position(|n| *n == name)
}

/// rflags bits, at their x86 positions. Bit 1 is reserved and always reads as one.
pub mod rflags {
    pub const CF: u64 = 1 << 0;
    pub const FIXED1: u64 = 1 << 1;
    pub const ZF: u64 = 1 << 6;
    pub const SF: u64 = 1 << 7;
    pub const IF: u64 = 1 << 9;
    pub const OF: u64 = 1 << 11;
    /// The bits the vCPU keeps; everything else reads as zero (bit 1 as one).
    pub const DEFINED: u64 = CF | FIXED1 | ZF | SF | IF | OF;
}

/// MSR indices `rdmsr`/`wrmsr` accept (their amd64 numbers). Any other index faults.
pub mod msr {
    pub const TSC: u32 = 0x10;
    pub const APIC_BASE: u32 = 0x1B;
    pub const EFER: u32 = 0xC000_0080;
    pub const FS_BASE: u32 = 0xC000_0100;
    pub const GS_BASE: u32 = 0xC000_0101;
    pub const KERNEL_GS_BASE: u32 = 0xC000_0102;
    pub const TSC_AUX: u32 = 0xC000_0103;
}

/// APIC base at reset: the default 0xFEE00000 with the global-enable bit (11), plus the BSP bit
/// (8) on vCPU 0, as on amd64.
pub const APIC_BASE_DEFAULT: u64 = 0xFEE0_0000 | (1 << 11);
pub const APIC_BASE_BSP: u64 = 1 << 8;

/// cr0 at reset, as on amd64 (CD | NW | ET).
pub const CR0_RESET: u64 = 0x6000_0010;
