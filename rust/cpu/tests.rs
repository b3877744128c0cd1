//! The ISA's semantics, one behaviour per test, and the determinism property: a run split by
//! budgets, pause requests or save/restore into a fresh vCPU ends exactly where one run does.

use std::sync::Arc;

use super::encode::Builder;
use super::isa::{self, msr, op, rflags, GPR_NAMES};
use super::*;
use crate::memory::{GuestAddress, GuestMemory, MemoryOptions};

const CODE: u64 = 0x1000;
const STACK_TOP: u64 = 0x8000;
const DATA: u64 = 0x9000;

const RAX: usize = 0;
const RCX: usize = 1;
const RDX: usize = 2;
const RBX: usize = 3;
const RSI: usize = 6;
const R8: usize = 8;

fn memory() -> Arc<GuestMemory> {
    let mut opts = MemoryOptions::new(8 << 20);
    opts.lowmem_limit = 4 << 20; // 4 MiB lowmem + 4 MiB highmem at 4 GiB, hole in between
    Arc::new(GuestMemory::new(&opts).unwrap())
}

fn vcpu_with(mem: &Arc<GuestMemory>, code: &Builder, vendor: Vendor) -> Vcpu {
    mem.write(GuestAddress(CODE), &code.code).unwrap();
    let mut cpu = Vcpu::new(mem.clone(), 0, vendor, TscMode::Instructions);
    cpu.set_register("rip", CODE).unwrap();
    cpu.set_register("rsp", STACK_TOP).unwrap();
    cpu
}

/// Run `code` (which ends in hlt) and return the vCPU.
fn run_to_hlt(code: &mut Builder) -> Vcpu {
    code.emit(op::HLT, 0, 0, 0);
    let mem = memory();
    let mut cpu = vcpu_with(&mem, code, Vendor::Intel);
    let exit = cpu.run(1_000_000).unwrap();
    assert!(matches!(exit, Exit::Hlt { .. }), "expected hlt, got {exit}");
    cpu
}

fn reg(cpu: &Vcpu, name: &str) -> u64 {
    cpu.get_register(name).unwrap()
}

fn flags(cpu: &Vcpu) -> u64 {
    reg(cpu, "rflags") & (rflags::CF | rflags::ZF | rflags::SF | rflags::OF)
}

/// `op a, b` on values x and y; returns (result, CF|ZF|SF|OF).
fn alu(opcode: u8, x: u64, y: u64) -> (u64, u64) {
    let mut b = Builder::new();
    b.movabs(RAX, x).movabs(RBX, y).emit(opcode, RAX, RBX, 0);
    let cpu = run_to_hlt(&mut b);
    (reg(&cpu, "rax"), flags(&cpu))
}

const CF: u64 = rflags::CF;
const ZF: u64 = rflags::ZF;
const SF: u64 = rflags::SF;
const OF: u64 = rflags::OF;

#[test]
fn add_sets_carry_and_overflow_like_amd64() {
    assert_eq!(alu(op::ADD, 2, 3), (5, 0));
    assert_eq!(alu(op::ADD, u64::MAX, 1), (0, CF | ZF));
    assert_eq!(alu(op::ADD, i64::MAX as u64, 1), (1 << 63, SF | OF));
    assert_eq!(alu(op::ADD, 1 << 63, 1 << 63), (0, CF | ZF | OF));
}

#[test]
fn sub_and_cmp_borrow_and_overflow() {
    assert_eq!(alu(op::SUB, 5, 3), (2, 0));
    assert_eq!(alu(op::SUB, 3, 5), ((-2i64) as u64, CF | SF));
    assert_eq!(alu(op::SUB, 1 << 63, 1), (i64::MAX as u64, OF));
    // cmp sets the same flags and leaves the destination alone.
    assert_eq!(alu(op::CMP, 3, 5), (3, CF | SF));
    assert_eq!(alu(op::CMP, 7, 7), (7, ZF));
}

#[test]
fn logic_ops_clear_carry_and_overflow() {
    assert_eq!(alu(op::AND, 0b1100, 0b1010), (0b1000, 0));
    assert_eq!(alu(op::OR, 0b1100, 0b1010), (0b1110, 0));
    assert_eq!(alu(op::XOR, 0b1100, 0b1100), (0, ZF));
    assert_eq!(alu(op::TEST, 1 << 63, u64::MAX), (1 << 63, SF));
}

#[test]
fn shifts_use_count_mod_64_and_report_the_last_bit_out() {
    assert_eq!(alu(op::SHL, 0x8000_0000_0000_0001, 1), (2, CF));
    assert_eq!(alu(op::SHR, 0b101, 1), (0b10, CF));
    assert_eq!(alu(op::SAR, (-8i64) as u64, 2), ((-2i64) as u64, SF));
    assert_eq!(alu(op::SHL, 1, 65), (2, 0), "count 65 is count 1");
    // A zero count changes nothing, flags included (the movabs left flags clear, cmp sets ZF).
    let mut b = Builder::new();
    b.emit(op::MOVI, RAX, 0, 7).emit(op::CMP, RAX, RAX, 0).emit(op::SHLI, RAX, 0, 64);
    let cpu = run_to_hlt(&mut b);
    assert_eq!((reg(&cpu, "rax"), flags(&cpu)), (7, ZF));
}

#[test]
fn mul_keeps_the_low_half_and_flags_a_high_half() {
    assert_eq!(alu(op::MUL, 6, 7), (42, 0));
    assert_eq!(alu(op::MUL, 1 << 32, 1 << 32), (0, CF | OF | ZF));
}

#[test]
fn division_is_unsigned_or_signed_and_leaves_flags_alone() {
    assert_eq!(alu(op::DIV, 100, 7).0, 14);
    assert_eq!(alu(op::REM, 100, 7).0, 2);
    assert_eq!(alu(op::IDIV, (-100i64) as u64, 7).0, (-14i64) as u64);
    assert_eq!(alu(op::IREM, (-100i64) as u64, 7).0, (-2i64) as u64);
    let mut b = Builder::new();
    b.emit(op::MOVI, RAX, 0, 9).emit(op::CMP, RAX, RAX, 0).emit(op::DIVI, RAX, 0, 2);
    let cpu = run_to_hlt(&mut b);
    assert_eq!((reg(&cpu, "rax"), flags(&cpu)), (4, ZF));
}

#[test]
fn divide_by_zero_is_a_fault_exit_that_retires_nothing() {
    for opcode in [op::DIV, op::REM, op::IDIV, op::IREM] {
        let mut b = Builder::new();
        b.emit(op::MOVI, RAX, 0, 1).emit(opcode, RAX, RBX, 0);
        let mem = memory();
        let mut cpu = vcpu_with(&mem, &b, Vendor::Intel);
        let exit = cpu.run(100).unwrap();
        assert_eq!(exit, Exit::Fault { kind: FaultKind::DivideError, rip: CODE + 8 });
        assert_eq!((reg(&cpu, "rip"), reg(&cpu, "rax"), cpu.instructions_retired()), (CODE + 8, 1, 1));
        // Running again faults again: nothing moved.
        assert_eq!(cpu.run(100).unwrap(), exit);
    }
    let mut b = Builder::new();
    b.movabs(RAX, 1 << 63).emit(op::IDIVI, RAX, 0, -1);
    let mem = memory();
    let mut cpu = vcpu_with(&mem, &b, Vendor::Intel);
    assert!(matches!(cpu.run(100).unwrap(), Exit::Fault { kind: FaultKind::DivideError, .. }));
}

#[test]
fn inc_dec_neg_not() {
    let mut b = Builder::new();
    b.emit(op::MOVI, RAX, 0, -1).emit(op::ADDI, RAX, 0, 1); // CF=1
    b.emit(op::INC, RAX, 0, 0); // inc leaves CF alone
    let cpu = run_to_hlt(&mut b);
    assert_eq!((reg(&cpu, "rax"), flags(&cpu)), (1, CF));

    let mut b = Builder::new();
    b.movabs(RAX, 1 << 63).emit(op::DEC, RAX, 0, 0);
    let cpu = run_to_hlt(&mut b);
    assert_eq!((reg(&cpu, "rax"), flags(&cpu)), (i64::MAX as u64, OF));

    let mut b = Builder::new();
    b.emit(op::MOVI, RAX, 0, 5).emit(op::NEG, RAX, 0, 0).emit(op::MOVI, RBX, 0, 0).emit(op::NOT, RBX, 0, 0);
    let cpu = run_to_hlt(&mut b);
    assert_eq!((reg(&cpu, "rax"), reg(&cpu, "rbx"), flags(&cpu)), ((-5i64) as u64, u64::MAX, CF | SF));
}

#[test]
fn mov_forms_sign_extend_imm32_and_movabs_takes_64_bits() {
    let mut b = Builder::new();
    b.emit(op::MOVI, RAX, 0, -2).movabs(RBX, 0x1122_3344_5566_7788).emit(op::MOV, RCX, RBX, 0).emit(op::LEA, RDX, RBX, -8);
    let cpu = run_to_hlt(&mut b);
    assert_eq!(reg(&cpu, "rax"), 0xFFFF_FFFF_FFFF_FFFE);
    assert_eq!(reg(&cpu, "rcx"), 0x1122_3344_5566_7788);
    assert_eq!(reg(&cpu, "rdx"), 0x1122_3344_5566_7780);
    assert_eq!(reg(&cpu, "rip"), CODE + 8 + 16 + 8 + 8 + 8, "movabs is 16 bytes, hlt retired");
}

#[test]
fn loads_zero_extend_and_stores_are_little_endian_and_dirty_their_page() {
    let mem = memory();
    mem.write(GuestAddress(DATA), &0x8877_6655_4433_2211u64.to_le_bytes()).unwrap();
    let mut dirty = vec![0u64; 64];
    mem.get_and_clear_dirty_segment(0, &mut dirty).unwrap();
    let mut b = Builder::new();
    b.emit(op::MOVI, RSI, 0, DATA as i32 + 16);
    b.emit(op::LD8, RAX, RSI, -16).emit(op::LD16, RBX, RSI, -16).emit(op::LD32, RCX, RSI, -16).emit(op::LD64, RDX, RSI, -16);
    b.emit(op::MOVI, R8, 0, -1);
    b.emit(op::ST16, RSI, R8, 0x1000); // 2 bytes at DATA+0x1010
    b.emit(op::HLT, 0, 0, 0);
    let mut cpu = vcpu_with(&mem, &b, Vendor::Intel);
    mem.get_and_clear_dirty_segment(0, &mut vec![0u64; 64]).unwrap(); // forget the code write
    assert!(matches!(cpu.run(100).unwrap(), Exit::Hlt { .. }));
    assert_eq!(reg(&cpu, "rax"), 0x11);
    assert_eq!(reg(&cpu, "rbx"), 0x2211);
    assert_eq!(reg(&cpu, "rcx"), 0x4433_2211);
    assert_eq!(reg(&cpu, "rdx"), 0x8877_6655_4433_2211);
    let mut back = [0u8; 4];
    mem.read(GuestAddress(DATA + 0x1010), &mut back).unwrap();
    assert_eq!(back, [0xFF, 0xFF, 0, 0]);
    let mut words = vec![0u64; 64];
    assert_eq!(mem.get_and_clear_dirty_segment(0, &mut words).unwrap(), 1);
    assert_eq!(words[0], 1 << ((DATA + 0x1010) >> 12));
}

#[test]
fn highmem_is_reached_through_the_slow_path() {
    let mut b = Builder::new();
    b.movabs(RSI, 4 << 30).emit(op::MOVI, RAX, 0, 0x5a).emit(op::ST8, RSI, RAX, 3).emit(op::LD64, RBX, RSI, 0);
    let cpu = run_to_hlt(&mut b);
    assert_eq!(reg(&cpu, "rbx"), 0x5a00_0000);
}

#[test]
fn branches_follow_amd64_conditions() {
    // (opcode, x, y, taken) after `cmp x, y`.
    let cases: &[(u8, i64, i64, bool)] = &[
        (op::JE, 1, 1, true),
        (op::JNE, 1, 1, false),
        (op::JL, -1, 1, true),
        (op::JL, 1, -1, false),
        (op::JLE, 1, 1, true),
        (op::JG, 2, 1, true),
        (op::JG, 1, 1, false),
        (op::JGE, 1, 1, true),
        (op::JB, 1, -1, true), // 1 < 0xffff.. unsigned
        (op::JB, -1, 1, false),
        (op::JBE, 1, 1, true),
        (op::JA, -1, 1, true),
        (op::JAE, 1, 2, false),
        (op::JS, 1, 2, true),
        (op::JNS, 1, 2, false),
        (op::JO, i64::MIN, 1, true),
        (op::JNO, i64::MIN, 1, false),
    ];
    for &(opcode, x, y, taken) in cases {
        let mut b = Builder::new();
        b.movabs(RAX, x as u64).movabs(RBX, y as u64).emit(op::CMP, RAX, RBX, 0);
        let target = b.here() + 16;
        b.branch(opcode, target).emit(op::MOVI, RCX, 0, 1); // skipped when taken
        let cpu = run_to_hlt(&mut b);
        assert_eq!(reg(&cpu, "rcx") == 0, taken, "opcode {opcode:#x} cmp {x}, {y}");
    }
}

#[test]
fn call_ret_push_pop_use_the_stack_through_rsp() {
    let mut b = Builder::new();
    b.emit(op::MOVI, RAX, 0, 11);
    b.emit(op::PUSH, RAX, 0, 0);
    let call_at = b.here();
    b.branch(op::CALL, call_at + 24); // to `func`
    b.emit(op::POP, RBX, 0, 0);
    b.emit(op::HLT, 0, 0, 0);
    b.emit(op::MOVI, RCX, 0, 99); // func:
    b.emit(op::RET, 0, 0, 0);
    let mem = memory();
    let mut cpu = vcpu_with(&mem, &b, Vendor::Intel);
    assert!(matches!(cpu.run(100).unwrap(), Exit::Hlt { .. }));
    assert_eq!((reg(&cpu, "rbx"), reg(&cpu, "rcx"), reg(&cpu, "rsp")), (11, 99, STACK_TOP));
    let mut ret = [0u8; 8];
    mem.read(GuestAddress(STACK_TOP - 16), &mut ret).unwrap();
    assert_eq!(u64::from_le_bytes(ret), CODE + call_at + 8, "call pushed the address after itself");
}

#[test]
fn a_stack_outside_ram_faults_without_moving_rsp() {
    let mut b = Builder::new();
    b.emit(op::PUSH, RAX, 0, 0);
    let mem = memory();
    let mut cpu = vcpu_with(&mem, &b, Vendor::Intel);
    cpu.set_register("rsp", 3 << 30).unwrap(); // in the hole
    assert_eq!(cpu.run(10).unwrap(), Exit::Fault { kind: FaultKind::StackUnmapped, rip: CODE });
    assert_eq!(reg(&cpu, "rsp"), 3 << 30);
}

#[test]
fn out_exits_after_retiring_with_the_value() {
    let mut b = Builder::new();
    b.emit(op::MOVI, RAX, 0, 0x1234_5678).emit(op::OUT16, 0, RAX, 0x3f8);
    b.emit(op::MOVI, RDX, 0, 0x80).emit(op::OUT8R, RDX, RAX, 0);
    let mem = memory();
    let mut cpu = vcpu_with(&mem, &b, Vendor::Intel);
    assert_eq!(cpu.run(100).unwrap(), Exit::Inout { port: 0x3f8, size: 2, is_in: false, value: 0x5678, rip: CODE + 8 });
    assert_eq!((reg(&cpu, "rip"), cpu.instructions_retired()), (CODE + 16, 2));
    assert_eq!(cpu.run(100).unwrap(), Exit::Inout { port: 0x80, size: 1, is_in: false, value: 0x78, rip: CODE + 24 });
}

#[test]
fn in_waits_for_complete_read_which_retires_it() {
    let mut b = Builder::new();
    b.emit(op::MOVI, RBX, 0, -1).emit(op::IN8, RBX, 0, 0x60).emit(op::HLT, 0, 0, 0);
    let mem = memory();
    let mut cpu = vcpu_with(&mem, &b, Vendor::Amd);
    assert_eq!(cpu.run(100).unwrap(), Exit::Inout { port: 0x60, size: 1, is_in: true, value: 0, rip: CODE + 8 });
    assert_eq!((reg(&cpu, "rip"), cpu.instructions_retired()), (CODE + 8, 1), "in has not retired");
    let err = cpu.run(100).unwrap_err();
    assert!(err.to_string().contains("in8 rbx from port 0x60"), "{err}");
    let err = cpu.complete_read(0x100).unwrap_err();
    assert!(err.to_string().contains("0x100 does not fit the 1 bytes"), "{err}");
    cpu.complete_read(0xAB).unwrap();
    assert_eq!((reg(&cpu, "rbx"), reg(&cpu, "rip"), cpu.instructions_retired()), (0xAB, CODE + 16, 2));
    assert!(matches!(cpu.run(100).unwrap(), Exit::Hlt { .. }));
    assert_eq!(cpu.complete_read(1).unwrap_err(), CpuError::NoReadPending { vcpu: 0 });
}

#[test]
fn unbacked_loads_and_stores_are_mmio_exits() {
    let mut b = Builder::new();
    b.movabs(RSI, 0xFEE0_0000).emit(op::MOVI, RAX, 0, 0x77);
    b.emit(op::ST32, RSI, RAX, 0xB0).emit(op::LD32, RBX, RSI, 0x20).emit(op::HLT, 0, 0, 0);
    let mem = memory();
    let mut cpu = vcpu_with(&mem, &b, Vendor::Intel);
    let exit = cpu.run(100).unwrap();
    assert_eq!(exit, Exit::Mmio { gpa: 0xFEE0_00B0, size: 4, is_write: true, value: 0x77, rip: CODE + 24 });
    let exit = cpu.run(100).unwrap();
    assert_eq!(exit, Exit::Mmio { gpa: 0xFEE0_0020, size: 4, is_write: false, value: 0, rip: CODE + 32 });
    cpu.complete_read(0x1400_0000).unwrap();
    assert!(matches!(cpu.run(100).unwrap(), Exit::Hlt { .. }));
    assert_eq!(reg(&cpu, "rbx"), 0x1400_0000);
}

#[test]
fn an_access_running_off_the_end_of_a_segment_faults() {
    let mut b = Builder::new();
    b.emit(op::MOVI, RSI, 0, (4 << 20) - 4).emit(op::LD64, RAX, RSI, 0);
    let mem = memory();
    let mut cpu = vcpu_with(&mem, &b, Vendor::Intel);
    assert_eq!(cpu.run(10).unwrap(), Exit::Fault { kind: FaultKind::CrossesSegment, rip: CODE + 8 });
}

#[test]
fn bad_instructions_fault() {
    let mem = memory();
    let mut b = Builder::new();
    b.raw(&[0; 8]);
    let mut cpu = vcpu_with(&mem, &b, Vendor::Intel);
    assert_eq!(cpu.run(10).unwrap(), Exit::Fault { kind: FaultKind::InvalidOpcode, rip: CODE });
    let mut b = Builder::new();
    b.raw(&[op::NOP, 0x10, 0, 0, 0, 0, 0, 0]); // register field 16
    let mut cpu = vcpu_with(&mem, &b, Vendor::Intel);
    assert_eq!(cpu.run(10).unwrap(), Exit::Fault { kind: FaultKind::ReservedBits, rip: CODE });
    let mut cpu = Vcpu::new(mem.clone(), 0, Vendor::Intel, TscMode::Instructions);
    cpu.set_register("rip", 3 << 30).unwrap();
    assert_eq!(cpu.run(10).unwrap(), Exit::Fault { kind: FaultKind::FetchUnmapped, rip: 3 << 30 });
    let mut b = Builder::new();
    b.emit(op::MOVI, RCX, 0, 0x1234).emit(op::RDMSR, 0, 0, 0);
    let mut cpu = vcpu_with(&mem, &b, Vendor::Intel);
    assert_eq!(cpu.run(10).unwrap(), Exit::Fault { kind: FaultKind::UnknownMsr, rip: CODE + 8 });
    let mut b = Builder::new();
    b.emit(op::MOV_TO_CR, 2, RAX, 0);
    let mut cpu = vcpu_with(&mem, &b, Vendor::Intel);
    assert_eq!(cpu.run(10).unwrap(), Exit::Fault { kind: FaultKind::UnknownControlRegister, rip: CODE });
}

#[test]
fn rdtsc_counts_instructions_retired_before_it_plus_the_offset() {
    let mut b = Builder::new();
    b.emit(op::NOP, 0, 0, 0).emit(op::NOP, 0, 0, 0).emit(op::RDTSC, 0, 0, 0);
    b.emit(op::MOVI, RCX, 0, msr::TSC_AUX as i32).emit(op::MOVI, RAX, 0, 7).emit(op::WRMSR, 0, 0, 0);
    b.emit(op::RDTSCP, 0, 0, 0);
    let mem = memory();
    let mut cpu = vcpu_with(&mem, b.emit(op::HLT, 0, 0, 0), Vendor::Intel);
    cpu.set_tsc_offset((5u64 << 32) + 1000);
    cpu.set_register("rax", 0).unwrap();
    let mut first = cpu.run(3).unwrap();
    assert_eq!(first, Exit::Budget);
    assert_eq!((reg(&cpu, "rax"), reg(&cpu, "rdx")), (1002, 5), "2 nops retired before rdtsc");
    first = cpu.run(100).unwrap();
    assert!(matches!(first, Exit::Hlt { .. }));
    assert_eq!((reg(&cpu, "rax"), reg(&cpu, "rdx"), reg(&cpu, "rcx")), (1006, 5, 7));
    assert_eq!(cpu.tsc(), (5u64 << 32) + 1000 + 8);
}

#[test]
fn writing_the_tsc_msr_moves_the_offset() {
    let mut b = Builder::new();
    b.emit(op::NOP, 0, 0, 0).emit(op::MOVI, RCX, 0, msr::TSC as i32).emit(op::MOVI, RAX, 0, 500).emit(op::MOVI, RDX, 0, 0);
    b.emit(op::WRMSR, 0, 0, 0).emit(op::RDTSC, 0, 0, 0);
    let cpu = run_to_hlt(&mut b);
    assert_eq!(reg(&cpu, "rax"), 501, "the TSC reads 500 at the wrmsr, one more at the next instruction");
    assert_eq!(cpu.tsc_offset(), 500 - 4);
}

#[test]
fn msrs_control_registers_and_idtr_are_reachable_from_the_guest() {
    let mut b = Builder::new();
    b.emit(op::MOVI, RCX, 0, msr::KERNEL_GS_BASE as i32).emit(op::MOVI, RAX, 0, 0x1000).emit(op::MOVI, RDX, 0, 0xFFFF);
    b.emit(op::WRMSR, 0, 0, 0).emit(op::MOVI, RAX, 0, 0).emit(op::MOVI, RDX, 0, 0).emit(op::RDMSR, 0, 0, 0);
    b.emit(op::MOVI, RBX, 0, 0x3000).emit(op::MOV_TO_CR, 3, RBX, 0).emit(op::MOV_FROM_CR, R8, 0, 0);
    b.emit(op::LIDT, RBX, 0, 0).emit(op::SIDT, RSI, 0, 0);
    let cpu = run_to_hlt(&mut b);
    assert_eq!(reg(&cpu, "kernel_gs_base"), 0xFFFF_0000_1000);
    assert_eq!((reg(&cpu, "rax"), reg(&cpu, "rdx")), (0x1000, 0xFFFF));
    assert_eq!((reg(&cpu, "cr3"), reg(&cpu, "r8")), (0x3000, super::isa::CR0_RESET));
    assert_eq!((reg(&cpu, "idtr"), reg(&cpu, "rsi")), (0x3000, 0x3000));
    assert_eq!(reg(&cpu, "apic_base"), 0xFEE0_0900, "vcpu 0 is the BSP");
}

/// A guest with a vector table at 0x2000 whose vector 0x20 handler counts into r15 and irets.
fn interrupt_guest(mem: &Arc<GuestMemory>) -> (Vcpu, u64) {
    let mut b = Builder::new();
    b.emit(op::MOVI, RAX, 0, 0x2000).emit(op::LIDT, RAX, 0, 0).emit(op::STI, 0, 0, 0);
    let idle = b.here();
    b.emit(op::HLT, 0, 0, 0);
    b.branch(op::JMP, idle);
    let handler = CODE + b.here();
    b.emit(op::INC, 15, 0, 0).emit(op::IRET, 0, 0, 0);
    mem.write(GuestAddress(0x2000 + 8 * 0x20), &handler.to_le_bytes()).unwrap();
    mem.write(GuestAddress(0x2000 + 8 * 0x21), &handler.to_le_bytes()).unwrap();
    (vcpu_with(mem, &b, Vendor::Intel), CODE + idle)
}

#[test]
fn hlt_is_woken_by_an_injected_interrupt_through_the_vector_table() {
    let mem = memory();
    let (mut cpu, idle) = interrupt_guest(&mem);
    assert_eq!(cpu.run(1000).unwrap(), Exit::Hlt { rip: idle + 8 });
    assert!(cpu.halted());
    // Still halted with nothing pending: run returns at once.
    assert_eq!(cpu.run(1000).unwrap(), Exit::Hlt { rip: idle + 8 });
    cpu.inject_interrupt(0x20);
    assert_eq!(cpu.pending_interrupts(), vec![0x20]);
    assert_eq!(cpu.run(1000).unwrap(), Exit::Hlt { rip: idle + 8 });
    assert_eq!(reg(&cpu, "r15"), 1, "the handler ran once");
    assert!(cpu.pending_interrupts().is_empty());
    assert_eq!(reg(&cpu, "rsp"), STACK_TOP, "iret popped the frame");
    assert_eq!(reg(&cpu, "rflags") & rflags::IF, rflags::IF);
}

#[test]
fn delivery_pushes_rflags_then_rip_and_clears_if_highest_vector_first() {
    let mem = memory();
    let (mut cpu, idle) = interrupt_guest(&mem);
    cpu.run(1000).unwrap();
    cpu.inject_interrupt(0x20);
    cpu.inject_interrupt(0x21);
    // Budget 1: deliver 0x21 (higher), execute the handler's `inc` only.
    assert_eq!(cpu.run(1).unwrap(), Exit::Budget);
    assert_eq!(cpu.pending_interrupts(), vec![0x20]);
    assert_eq!(reg(&cpu, "rflags") & rflags::IF, 0);
    let mut frame = [0u8; 16];
    mem.read(GuestAddress(STACK_TOP - 16), &mut frame).unwrap();
    assert_eq!(u64::from_le_bytes(frame[0..8].try_into().unwrap()), idle + 8, "rip pushed last");
    assert_eq!(u64::from_le_bytes(frame[8..16].try_into().unwrap()), rflags::FIXED1 | rflags::IF);
    assert_eq!(cpu.run(1000).unwrap(), Exit::Hlt { rip: idle + 8 });
    assert_eq!(reg(&cpu, "r15"), 2);
}

#[test]
fn interrupts_wait_while_if_is_clear_and_are_taken_right_after_sti() {
    let mut b = Builder::new();
    b.emit(op::MOVI, RAX, 0, 0x2000).emit(op::LIDT, RAX, 0, 0).emit(op::NOP, 0, 0, 0).emit(op::STI, 0, 0, 0);
    b.emit(op::MOVI, RBX, 0, 1).emit(op::HLT, 0, 0, 0);
    let handler = CODE + b.here();
    b.emit(op::MOV, RCX, RBX, 0).emit(op::IRET, 0, 0, 0);
    let mem = memory();
    mem.write(GuestAddress(0x2000 + 8 * 3), &handler.to_le_bytes()).unwrap();
    let mut cpu = vcpu_with(&mem, &b, Vendor::Amd);
    cpu.set_register("rbx", 5).unwrap();
    cpu.inject_interrupt(3);
    assert_eq!(cpu.run(3).unwrap(), Exit::Budget);
    assert_eq!(cpu.pending_interrupts(), vec![3], "IF=0: not delivered");
    assert!(matches!(cpu.run(100).unwrap(), Exit::Hlt { .. }));
    assert_eq!(reg(&cpu, "rcx"), 5, "delivered after sti, before `mov rbx, 1`");
    assert_eq!(reg(&cpu, "rbx"), 1);
}

#[test]
fn a_missing_vector_table_is_a_fault_and_the_vector_stays_pending() {
    let mut b = Builder::new();
    b.emit(op::NOP, 0, 0, 0);
    let mem = memory();
    let mut cpu = vcpu_with(&mem, &b, Vendor::Intel);
    cpu.set_register("idtr", 3 << 30).unwrap();
    cpu.set_register("rflags", rflags::IF).unwrap();
    cpu.inject_interrupt(9);
    assert_eq!(cpu.run(10).unwrap(), Exit::Fault { kind: FaultKind::VectorTableUnmapped, rip: CODE });
    assert_eq!(cpu.pending_interrupts(), vec![9]);
}

#[test]
fn a_pause_request_stops_a_running_vcpu_from_another_thread() {
    let mut b = Builder::new();
    b.emit(op::MOVI, RSI, 0, DATA as i32).emit(op::MOVI, RAX, 0, 1);
    let spin = b.here();
    b.emit(op::ST8, RSI, RAX, 0).branch(op::JMP, spin); // store 1, forever
    let mem = memory();
    let mut cpu = vcpu_with(&mem, &b, Vendor::Intel);
    let handle = cpu.handle();
    let runner = std::thread::spawn(move || {
        let exit = cpu.run(u64::MAX).unwrap();
        (exit, cpu)
    });
    // The request comes once the vCPU is running, however late its thread starts (a request
    // before run() stops it before any instruction: the next test). Bounded: 10 s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut byte = [0u8];
    while byte[0] == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
        mem.read(GuestAddress(DATA), &mut byte).unwrap();
    }
    assert_eq!(byte[0], 1, "the vCPU never ran its loop");
    handle.request_pause();
    let (exit, cpu) = runner.join().unwrap();
    assert_eq!(exit, Exit::PauseRequested);
    assert!(cpu.instructions_retired() > 2);
    let rip = reg(&cpu, "rip");
    assert!(rip == CODE + spin || rip == CODE + spin + isa::INSN_SIZE, "stopped inside its loop, at {rip:#x}");
}

#[test]
fn a_pause_requested_before_run_returns_before_any_instruction() {
    let mut b = Builder::new();
    b.emit(op::NOP, 0, 0, 0);
    let mem = memory();
    let mut cpu = vcpu_with(&mem, &b, Vendor::Intel);
    cpu.request_pause();
    assert_eq!(cpu.run(10).unwrap(), Exit::PauseRequested);
    assert_eq!(cpu.instructions_retired(), 0);
    assert_eq!(cpu.run(1).unwrap(), Exit::Budget, "the request was consumed");
}

#[test]
fn registers_refuse_unknown_names_and_undefined_rflags_bits() {
    let mem = memory();
    let mut cpu = Vcpu::new(mem, 3, Vendor::Amd, TscMode::Instructions);
    let err = cpu.set_register("rxx", 1).unwrap_err();
    assert!(err.to_string().starts_with("vcpu 3: unknown register 'rxx'"), "{err}");
    let err = cpu.set_register("rflags", 1 << 10).unwrap_err();
    assert!(err.to_string().contains("bits 0x400"), "{err}");
    assert_eq!(reg(&cpu, "rflags"), 0x2);
    assert_eq!(reg(&cpu, "apic_base"), 0xFEE0_0800, "not the BSP");
    assert_eq!(cpu.registers().len(), REGISTER_NAMES.len());
    assert_eq!(&REGISTER_NAMES[..16], &GPR_NAMES[..]);
}

// ---- determinism ----------------------------------------------------------------------------

/// A guest that mixes everything deterministic: arithmetic, memory (a page-walking checksum),
/// calls, rdtsc, and an interrupt handler that runs when `inject` vectors are pending.
fn busy_guest(mem: &Arc<GuestMemory>, vendor: Vendor) -> Vcpu {
    let mut b = Builder::new();
    b.emit(op::MOVI, RAX, 0, 0x2000).emit(op::LIDT, RAX, 0, 0).emit(op::STI, 0, 0, 0);
    b.emit(op::MOVI, RSI, 0, DATA as i32).emit(op::MOVI, RCX, 0, 5000).emit(op::MOVI, RBX, 0, 1);
    let top = b.here();
    b.emit(op::MULI, RBX, 0, 6364136).emit(op::ADDI, RBX, 0, 1442695);
    b.emit(op::LD64, RAX, RSI, 0).emit(op::XOR, RAX, RBX, 0).emit(op::ST64, RSI, RAX, 0);
    b.emit(op::ADDI, RSI, 0, 4104).emit(op::ANDI, RSI, 0, 0x1F_FFF8).emit(op::ORI, RSI, 0, DATA as i32);
    let call_at = b.here();
    b.branch(op::CALL, call_at + 8 * 4);
    b.emit(op::DEC, RCX, 0, 0);
    b.branch(op::JNE, top);
    b.emit(op::HLT, 0, 0, 0);
    // func: r9 += rdtsc low bits
    b.emit(op::RDTSC, 0, 0, 0).emit(op::ADD, 9, RAX, 0).emit(op::RET, 0, 0, 0);
    let handler = CODE + b.here();
    b.emit(op::PUSH, RAX, 0, 0).emit(op::RDTSC, 0, 0, 0).emit(op::ADD, 10, RAX, 0).emit(op::POP, RAX, 0, 0).emit(op::IRET, 0, 0, 0);
    for v in 0..256u64 {
        mem.write(GuestAddress(0x2000 + 8 * v), &handler.to_le_bytes()).unwrap();
    }
    let mut cpu = vcpu_with(mem, &b, vendor);
    cpu.set_tsc_offset(12345);
    cpu
}

fn memory_image(mem: &GuestMemory) -> Vec<u8> {
    let mut all = vec![0u8; 4 << 20];
    mem.read(GuestAddress(0), &mut all).unwrap();
    all
}

/// Registers, instructions retired, halted, pending vectors, TSC.
type FinalState = (Vec<(&'static str, u64)>, u64, bool, Vec<u8>, u64);

fn final_state(cpu: &Vcpu) -> FinalState {
    (cpu.registers(), cpu.instructions_retired(), cpu.halted(), cpu.pending_interrupts(), cpu.tsc())
}

/// Run `vendor`'s busy guest to hlt in slices of at most `slice` instructions; the interrupts in
/// `inject` are injected between runs when the retired count reaches each point, as a device model
/// would.
fn run_sliced(vendor: Vendor, inject: &[(u64, u8)], slice: u64) -> (Arc<GuestMemory>, Vcpu) {
    let mem = memory();
    let mut cpu = busy_guest(&mem, vendor);
    let mut pending = inject.to_vec();
    loop {
        while let Some(&(at, vector)) = pending.first() {
            if at != cpu.instructions_retired() {
                break;
            }
            cpu.inject_interrupt(vector);
            pending.remove(0);
        }
        let to_next = pending.first().map(|&(at, _)| at - cpu.instructions_retired()).unwrap_or(u64::MAX);
        match cpu.run(slice.min(to_next)).unwrap() {
            Exit::Budget => {}
            Exit::Hlt { .. } => return (mem, cpu),
            other => panic!("unexpected exit {other}"),
        }
    }
}

#[test]
fn splitting_a_run_into_budgets_changes_nothing() {
    let inject = [(1000, 0x30), (1000, 0x31), (20_000, 0x40)];
    let (mem_a, a) = run_sliced(Vendor::Intel, &inject, u64::MAX);
    assert!(a.instructions_retired() > 50_000);
    assert!(reg(&a, "r10") != 0, "the interrupt handler ran");
    for slice in [7u64, 4096, 1] {
        let (mem, cpu) = run_sliced(Vendor::Intel, &inject, slice);
        assert_eq!(final_state(&cpu), final_state(&a), "slice {slice}");
        assert_eq!(memory_image(&mem), memory_image(&mem_a), "slice {slice}");
    }
}

#[test]
fn save_and_restore_into_a_fresh_vcpu_at_every_kind_of_point_changes_nothing() {
    for vendor in [Vendor::Intel, Vendor::Amd] {
        let inject = [(1000, 0x30), (1000, 0x31)];
        let (mem_a, a) = run_sliced(vendor, &inject, u64::MAX);
        let mem = memory();
        let mut cpu = busy_guest(&mem, vendor);
        let mut count = 0;
        // Before every run of up to 3001 instructions, save and restore into a fresh vCPU. The
        // interrupts are injected just before a save, so they travel in the state.
        loop {
            if cpu.instructions_retired() == 1000 {
                cpu.inject_interrupt(0x30);
                cpu.inject_interrupt(0x31);
            }
            let state = cpu.save_state();
            assert_eq!(state.registers.vendor(), vendor);
            let mut fresh = Vcpu::new(mem.clone(), 0, vendor, TscMode::Instructions);
            fresh.restore_state(&state).unwrap();
            assert_eq!(fresh.save_state(), state, "restore then save is the identity");
            cpu = fresh;
            count += 1;
            let to_inject = if cpu.instructions_retired() < 1000 { 1000 - cpu.instructions_retired() } else { u64::MAX };
            if matches!(cpu.run(to_inject.min(3001)).unwrap(), Exit::Hlt { .. }) {
                break;
            }
        }
        assert!(count > 10);
        assert_eq!(final_state(&cpu), final_state(&a), "{vendor}");
        assert_eq!(memory_image(&mem), memory_image(&mem_a));
    }
}

#[test]
fn a_pending_read_and_pending_interrupts_travel_in_the_state() {
    let mut b = Builder::new();
    b.emit(op::IN32, RDX, 0, 0x64).emit(op::HLT, 0, 0, 0);
    let mem = memory();
    let mut cpu = vcpu_with(&mem, &b, Vendor::Amd);
    cpu.inject_interrupt(200);
    assert!(matches!(cpu.run(10).unwrap(), Exit::Inout { is_in: true, .. }));
    let state = cpu.save_state();
    let mut fresh = Vcpu::new(mem.clone(), 0, Vendor::Amd, TscMode::Instructions);
    fresh.restore_state(&state).unwrap();
    assert_eq!(fresh.pending_interrupts(), vec![200]);
    fresh.complete_read(0xDEAD_BEEF).unwrap();
    assert_eq!(reg(&fresh, "rdx"), 0xDEAD_BEEF);
    assert_eq!(reg(&fresh, "rip"), CODE + 8);
}

#[test]
fn restore_refuses_the_other_vendor_and_bad_states_and_changes_nothing() {
    let mem = memory();
    let mut intel = Vcpu::new(mem.clone(), 0, Vendor::Intel, TscMode::Instructions);
    let amd = Vcpu::new(mem.clone(), 0, Vendor::Amd, TscMode::Instructions);
    intel.set_register("rax", 42).unwrap();
    let before = intel.save_state();
    let err = intel.restore_state(&amd.save_state()).unwrap_err();
    assert_eq!(err.to_string(), "vcpu 0 is an intel vcpu and cannot restore amd state");
    let mut bad = amd.save_state();
    if let VendorState::Amd { vmcb_save, .. } = &mut bad.registers {
        vmcb_save.cpl = 3;
    }
    let mut amd = amd;
    let err = amd.restore_state(&bad).unwrap_err();
    assert!(err.to_string().contains("'vmcb_save.cpl' = 0x3"), "{err}");
    let mut skewed = before.clone();
    skewed.guest_tsc += 1;
    assert!(intel.restore_state(&skewed).unwrap_err().to_string().contains("guest_tsc"));
    let host = Vcpu::new(mem.clone(), 0, Vendor::Intel, TscMode::Host);
    assert!(matches!(intel.restore_state(&host.save_state()), Err(CpuError::TscModeMismatch { .. })));
    assert_eq!(intel.save_state(), before);
}

#[test]
fn vendor_layouts_differ_and_name_their_fields() {
    let mem = memory();
    let mut intel = Vcpu::new(mem.clone(), 2, Vendor::Intel, TscMode::Instructions);
    let mut amd = Vcpu::new(mem.clone(), 2, Vendor::Amd, TscMode::Instructions);
    for cpu in [&mut intel, &mut amd] {
        cpu.set_register("rax", 1).unwrap();
        cpu.set_register("rsp", 2).unwrap();
        cpu.set_register("r15", 3).unwrap();
    }
    let groups = intel.save_state().registers.groups();
    assert_eq!(groups.iter().map(|g| g.0).collect::<Vec<_>>(), vec!["vmcs", "vmxctx", "guest_msrs"]);
    assert!(groups[0].1.contains(&("guest_rsp", 2)) && groups[0].1.contains(&("vpid", 3)));
    assert!(groups[1].1.contains(&("guest_rax", 1)) && groups[1].1.contains(&("guest_r15", 3)));
    let groups = amd.save_state().registers.groups();
    assert_eq!(groups.iter().map(|g| g.0).collect::<Vec<_>>(), vec!["vmcb_save", "vmcb_control", "swctx", "guest_msrs"]);
    assert!(groups[0].1.contains(&("rax", 1)) && groups[0].1.contains(&("rsp", 2)) && groups[0].1.contains(&("cpl", 0)));
    assert!(groups[2].1.contains(&("sctx_r15", 3)));
}

#[test]
fn a_host_clock_tsc_continues_from_the_saved_value_after_restore() {
    let mem = memory();
    let cpu = Vcpu::new(mem.clone(), 0, Vendor::Intel, TscMode::Host);
    let state = cpu.save_state();
    std::thread::sleep(std::time::Duration::from_millis(30));
    let mut fresh = Vcpu::new(mem, 0, Vendor::Intel, TscMode::Host);
    fresh.restore_state(&state).unwrap();
    let tsc = fresh.tsc();
    assert!(tsc >= state.guest_tsc, "never backwards");
    assert!(tsc - state.guest_tsc < 20_000_000, "did not jump by the 30 ms suspended: {}", tsc - state.guest_tsc);
}

#[test]
fn guest_code_rewritten_by_a_store_runs_as_rewritten() {
    // The guest overwrites the instruction after its store with `mov rcx, 7`.
    let patched = super::encode::insn(op::MOVI, RCX, 0, 7);
    let mut b = Builder::new();
    b.movabs(RAX, u64::from_le_bytes(patched)).emit(op::MOVI, RSI, 0, CODE as i32);
    b.emit(op::ST64, RSI, RAX, 32).emit(op::MOVI, RCX, 0, 1); // at CODE+32: replaced before it runs
    let cpu = run_to_hlt(&mut b);
    assert_eq!(reg(&cpu, "rcx"), 7);
}

// ---- lazily restored memory -----------------------------------------------------------------

/// A lazy image of `from` (lowmem 4 MiB then highmem, 1 MiB chunks) whose `bad` chunk fails.
struct CopyOf {
    from: Arc<GuestMemory>,
    bad: Option<usize>,
}

impl crate::memory::ChunkSource for CopyOf {
    fn name(&self) -> &str {
        "copy"
    }
    unsafe fn load(&self, index: usize, parts: &[crate::memory::ChunkPart]) -> Result<(), crate::memory::ChunkFault> {
        if self.bad == Some(index) {
            return Err(crate::memory::ChunkFault::Mismatch);
        }
        for part in parts {
            let image = (index << 20) + part.chunk_offset;
            let gpa = if image < 4 << 20 { image as u64 } else { crate::memory::HIGHMEM_BASE + (image - (4 << 20)) as u64 };
            // SAFETY: the part is writable and ours for the call.
            let out = unsafe { std::slice::from_raw_parts_mut(part.ptr, part.len) };
            self.from.read(GuestAddress(gpa), out).unwrap();
        }
        Ok(())
    }
}

fn lazy_copy(from: &Arc<GuestMemory>, bad: Option<usize>) -> Arc<GuestMemory> {
    let mut opts = MemoryOptions::new(8 << 20);
    opts.lowmem_limit = 4 << 20;
    Arc::new(GuestMemory::lazy(&opts, 1 << 20, Box::new(CopyOf { from: from.clone(), bad })).unwrap())
}

#[test]
fn a_guest_on_lazily_restored_memory_ends_exactly_as_on_the_original() {
    let original = memory();
    let mut a = busy_guest(&original, Vendor::Intel);
    let saved = a.save_state();
    let lazy = lazy_copy(&original, None);
    assert!(!lazy.is_complete());
    let mut b = Vcpu::new(lazy.clone(), 0, Vendor::Intel, TscMode::Instructions);
    b.restore_state(&saved).unwrap();
    // The lazy guest first, and its memory read whole: chunks load from the original as saved.
    b.inject_interrupt(0x30);
    assert!(matches!(b.run(u64::MAX).unwrap(), Exit::Hlt { .. }));
    assert_eq!(lazy.lazy_image().unwrap().counts(), (2, 0), "the chunks the guest touched");
    let lazy_image = memory_image(&lazy);
    a.inject_interrupt(0x30);
    assert!(matches!(a.run(u64::MAX).unwrap(), Exit::Hlt { .. }));
    assert_eq!(final_state(&b), final_state(&a));
    assert!(lazy_image == memory_image(&original), "the same memory");
}

#[test]
fn a_bad_chunk_stops_the_vcpu_at_the_instruction_that_needs_it() {
    let original = memory();
    let mut code = Builder::new();
    code.emit(op::MOVI, RCX, 0, 5).emit(op::MOVI, RSI, 0, 0x20_0010).emit(op::LD64, RAX, RSI, 0).emit(op::HLT, 0, 0, 0);
    let saved = vcpu_with(&original, &code, Vendor::Intel).save_state();
    let lazy = lazy_copy(&original, Some(2)); // the load's chunk
    let mut cpu = Vcpu::new(lazy, 0, Vendor::Intel, TscMode::Instructions);
    cpu.restore_state(&saved).unwrap();
    let before = cpu.registers();
    let err = cpu.run(u64::MAX).unwrap_err();
    assert_eq!(
        err.to_string(),
        "vcpu 0 stopped at rip 0x1010: copy: memory chunk 2 (file bytes 0x200000..0x300000, guest-physical 0x200000..0x300000) \
         does not match its recorded hash; the guest may not use it"
    );
    assert_eq!(cpu.instructions_retired(), 2, "the load did not retire");
    assert_eq!(reg(&cpu, "rip"), CODE + 16);
    assert_eq!(reg(&cpu, "rax"), before.iter().find(|(n, _)| *n == "rax").unwrap().1);
    assert!(cpu.run(u64::MAX).is_err(), "and it never goes on");
    // Code in a bad chunk does not run at all.
    let lazy = lazy_copy(&original, Some(0));
    let mut cpu = Vcpu::new(lazy, 0, Vendor::Intel, TscMode::Instructions);
    cpu.restore_state(&saved).unwrap();
    assert!(matches!(cpu.run(u64::MAX), Err(CpuError::MemoryUnavailable { rip: CODE, .. })));
    assert_eq!(cpu.instructions_retired(), 0);
}
