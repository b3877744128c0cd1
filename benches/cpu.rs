//! vCPU throughput: a tight `dec; jnz` loop (instructions per second) and a loop that stores
//! one qword into each page of a 16 MiB buffer (pages dirtied per second, every store going
//! through the dirty bitmap); and the tight loop on lazily restored memory that is still loading
//! (every access checks its chunk) and once it is complete. Run with `cargo bench --bench cpu`.

use std::sync::Arc;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use vmm_core::cpu::encode::Builder;
use vmm_core::cpu::isa::op;
use vmm_core::cpu::{Exit, TscMode, Vcpu, Vendor};
use vmm_core::memory::{ChunkFault, ChunkPart, ChunkSource, GuestAddress, GuestMemory, MemoryOptions};

const CODE: u64 = 0x1000;
const RCX: usize = 1;
const RSI: usize = 6;
const LOOPS: u64 = 10_000_000;
const BUFFER: u64 = 0x10_0000;
const BUFFER_PAGES: i32 = 4096; // 16 MiB

fn vcpu(code: &Builder) -> (Arc<GuestMemory>, Vcpu) {
    let mem = Arc::new(GuestMemory::new(&MemoryOptions::new(64 << 20)).unwrap());
    mem.write(GuestAddress(CODE), &code.code).unwrap();
    let cpu = Vcpu::new(mem.clone(), 0, Vendor::Intel, TscMode::Instructions);
    (mem, cpu)
}

/// start: mov rcx, LOOPS; top: dec rcx; jnz top; out 0x80, rcx; jmp start
fn dec_jnz_loop() -> Builder {
    let mut b = Builder::new();
    b.emit(op::MOVI, RCX, 0, LOOPS as i32);
    let top = b.here();
    b.emit(op::DEC, RCX, 0, 0);
    b.branch(op::JNE, top);
    b.emit(op::OUT8, 0, RCX, 0x80);
    b.branch(op::JMP, 0);
    b
}

/// Time `cpu` from where it is to its next `out 0x80` (one pass of the loop), as `name`.
fn bench_one_pass(group: &mut BenchmarkGroup<'_, WallTime>, name: &str, cpu: &mut Vcpu) {
    cpu.set_register("rip", CODE).unwrap();
    group.bench_function(name, |bench| {
        bench.iter(|| {
            let exit = cpu.run(u64::MAX).unwrap();
            assert!(matches!(exit, Exit::Inout { port: 0x80, .. }), "{exit}");
        })
    });
}

fn tight_loop(c: &mut Criterion) {
    let (_mem, mut cpu) = vcpu(&dec_jnz_loop());
    let mut group = c.benchmark_group("vcpu");
    group.throughput(Throughput::Elements(2 * LOOPS + 2));
    group.sample_size(20);
    bench_one_pass(&mut group, "dec_jnz_loop", &mut cpu);
    group.finish();
}

fn dirtying_loop(c: &mut Criterion) {
    // Store into every page of the buffer, round and round:
    //   start: mov rsi, BUFFER; mov rcx, PAGES; top: st64 [rsi], rcx; add rsi, 4096; dec rcx; jnz top;
    //   out 0x80, rcx; jmp start
    let mut b = Builder::new();
    b.emit(op::MOVI, RSI, 0, BUFFER as i32).emit(op::MOVI, RCX, 0, BUFFER_PAGES);
    let top = b.here();
    b.emit(op::ST64, RSI, RCX, 0).emit(op::ADDI, RSI, 0, 4096).emit(op::DEC, RCX, 0, 0);
    b.branch(op::JNE, top);
    b.emit(op::OUT8, 0, RCX, 0x80);
    b.branch(op::JMP, 0);
    let (mem, mut cpu) = vcpu(&b);
    cpu.set_register("rip", CODE).unwrap();
    let mut words = vec![0u64; mem.segments()[0].pages().div_ceil(64)];
    mem.get_and_clear_dirty_segment(0, &mut words).unwrap(); // forget the code load
    let mut group = c.benchmark_group("vcpu");
    group.throughput(Throughput::Elements(BUFFER_PAGES as u64));
    group.sample_size(20);
    group.bench_function("dirty_one_qword_per_page (elements = pages)", |bench| {
        bench.iter(|| {
            let exit = cpu.run(u64::MAX).unwrap();
            assert!(matches!(exit, Exit::Inout { port: 0x80, .. }), "{exit}");
            // Harvest, as a migration round would, so each iteration dirties clean pages.
            words.iter_mut().for_each(|w| *w = 0);
            let dirtied = mem.get_and_clear_dirty_segment(0, &mut words).unwrap();
            assert_eq!(dirtied, BUFFER_PAGES as usize);
        })
    });
    group.finish();
}

/// A lazy image copied from eager memory (lowmem only, 4 MiB chunks).
struct CopyOf(Arc<GuestMemory>);

impl ChunkSource for CopyOf {
    fn name(&self) -> &str {
        "bench"
    }
    unsafe fn load(&self, index: usize, parts: &[ChunkPart]) -> Result<(), ChunkFault> {
        for part in parts {
            // SAFETY: the part is writable and ours for the call.
            let out = unsafe { std::slice::from_raw_parts_mut(part.ptr, part.len) };
            self.0.read(GuestAddress(((index << 22) + part.chunk_offset) as u64), out).unwrap();
        }
        Ok(())
    }
}

fn lazy_tight_loop(c: &mut Criterion) {
    let (image, _) = vcpu(&dec_jnz_loop());
    let mut group = c.benchmark_group("vcpu");
    group.throughput(Throughput::Elements(2 * LOOPS + 2));
    group.sample_size(20);
    for complete in [false, true] {
        let mem = Arc::new(GuestMemory::lazy(&MemoryOptions::new(64 << 20), 4 << 20, Box::new(CopyOf(image.clone()))).unwrap());
        if complete {
            mem.ensure_all().unwrap();
        }
        let mut cpu = Vcpu::new(mem.clone(), 0, Vendor::Intel, TscMode::Instructions);
        let name = if complete { "dec_jnz_loop_lazy_memory_complete" } else { "dec_jnz_loop_lazy_memory_loading" };
        bench_one_pass(&mut group, name, &mut cpu);
        assert_eq!(mem.is_complete(), complete);
    }
    group.finish();
}

criterion_group!(benches, tight_loop, dirtying_loop, lazy_tight_loop);
criterion_main!(benches);
