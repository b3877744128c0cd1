//! The loopback TCP ceiling the benchmark holds vmmpy's migrations against: how fast this machine
//! moves bytes from one process to another over 127.0.0.1, with native code on both ends and
//! nothing else to do (no framing, no guest memory to fill, a receive buffer that stays in cache).
//! A migration cannot beat it, so a ratio above 1 against it means a broken measurement.
//!
//!     cargo run --release --example tcp_ceiling -- BYTES STREAMS BUFFER [WAKE [SPAN]]
//!
//! BUFFER is the SO_SNDBUF/SO_RCVBUF asked for on every socket, or 0 to leave the kernel's
//! autotuning alone; `N/auto` asks for an N-byte SO_SNDBUF and leaves the receive buffer to the
//! kernel, as vmmpy's migration sockets do since session 38 (a receive buffer set is locked).
//! WAKE is how the receiver's reads wait: `any` (the default) returns whatever has arrived, so a
//! reader that keeps up is woken for every segment; `whole` waits as vmmpy's receivers do
//! (`WholeReads` in rust/wire/stall.rs): it sets SO_RCVLOWAT to what its MiB still lacks, sleeps
//! in poll() until that much is queued (or the stream ends) and then reads what is there without
//! blocking. On a VM, where every wake-up of an idle CPU costs the sender an interprocessor
//! interrupt, `whole` moved 1 GiB over one stream up to three times faster than `any`
//! (docs/performance.md, session 31), so a ceiling without it was no ceiling.
//!
//! SPAN is how much memory the senders read from, in bytes (rounded up to whole MiB; 1 MiB when
//! left out). With 1 MiB every write sends the same cached MiB: the most the loopback itself
//! carries, and the figure the benchmark's targets are against. With SPAN as large as a guest
//! (1 GiB) the senders read each byte from memory once, as a migration's sender must read guest
//! memory: the most a sender that does nothing else can move from memory on this machine. That
//! memory is on transparent huge pages where the host offers them, as vmmpy's guest memory is.
//!
//! The parent sends; a child process (this program again, `receive` mode) listens, receives BYTES
//! in all over STREAMS connections at once and answers one byte when it has every one. Printed:
//! `gib_per_s=<rate>`, timed from the first send to that answer; then `sender_peak_kib=<KiB>`,
//! the sender's peak resident memory (VmHWM), which shows the SPAN it read from was there.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, ExitCode, Stdio};
use std::thread;
use std::time::Instant;

const CHUNK: usize = 1 << 20;

fn set_buffer(sock: &TcpStream, opt: libc::c_int, bytes: usize) {
    if bytes == 0 {
        return;
    }
    set_option(sock, opt, bytes);
}

fn set_option(sock: &TcpStream, opt: libc::c_int, value: usize) {
    let value = value as libc::c_int;
    // SAFETY: a valid socket and a pointer to a c_int of the length passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            &value as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        eprintln!("tcp_ceiling: setsockopt: {}", std::io::Error::last_os_error());
    }
}

fn receive(streams: usize, buffer: usize, whole: bool) -> Result<(), String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    println!("{}", listener.local_addr().map_err(|e| e.to_string())?.port());
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let mut conns = Vec::with_capacity(streams);
    for _ in 0..streams {
        let (sock, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        set_buffer(&sock, libc::SO_RCVBUF, buffer);
        conns.push(sock);
    }
    let first = conns[0].try_clone().map_err(|e| e.to_string())?;
    let workers: Vec<_> = conns
        .into_iter()
        .map(|mut sock| {
            thread::spawn(move || -> std::io::Result<u64> {
                let mut buf = vec![0u8; CHUNK];
                let mut got = 0u64;
                let mut lowat = 1;
                loop {
                    let n = if whole { read_whole(&sock, &mut buf, &mut lowat)? } else { sock.read(&mut buf)? };
                    got += n as u64;
                    // A whole read comes back short only at the end of the stream.
                    if n == 0 || (whole && n < CHUNK) {
                        return Ok(got);
                    }
                }
            })
        })
        .collect();
    let mut total = 0u64;
    for w in workers {
        total += w.join().map_err(|_| "a receiver thread panicked".to_string())?.map_err(|e| format!("recv: {e}"))?;
    }
    (&first).write_all(&total.to_le_bytes()).map_err(|e| format!("answer: {e}"))?;
    Ok(())
}

/// Fill `buf` (fewer bytes only where the stream ends) as vmmpy's receivers wait: the low-water
/// mark set to what is still missing, so poll() wakes once that much is queued, then a read that
/// does not block. A read that blocked with the mark set would, after copying part of what it
/// needs, wait for a whole mark of new bytes. `lowat` is the mark the socket has now.
fn read_whole(sock: &TcpStream, buf: &mut [u8], lowat: &mut usize) -> std::io::Result<usize> {
    let fd = sock.as_raw_fd();
    let mut got = 0;
    while got < buf.len() {
        let missing = buf.len() - got;
        if missing != *lowat {
            set_option(sock, libc::SO_RCVLOWAT, missing);
            *lowat = missing;
        }
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd of ours, for the duration of the call. POLLIN comes when the mark
        // is queued, at the end of the stream, on an error or under memory pressure.
        if unsafe { libc::poll(&mut pfd, 1, -1) } < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        // SAFETY: `missing` bytes of `buf` from `got` are ours to write.
        let n = unsafe { libc::recv(fd, buf[got..].as_mut_ptr().cast(), missing, libc::MSG_DONTWAIT) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if matches!(err.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            break;
        }
        got += n as usize;
    }
    Ok(got)
}

/// `span` bytes of incompressible memory to send from, so nothing on the path could shortcut them
/// (loopback does not compress, but the ceiling should not depend on knowing that); on huge
/// pages where the host offers them (`MADV_HUGEPAGE`; refused quietly where it does not).
struct Payload {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: written once before the senders start, then only read.
unsafe impl Send for Payload {}
unsafe impl Sync for Payload {}

impl Payload {
    fn new(len: usize) -> Result<Payload, String> {
        // SAFETY: a fresh private anonymous mapping; checked below.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!("cannot map {len} bytes to send from: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: the mapping just made; advice only.
        unsafe { libc::madvise(ptr, len, libc::MADV_HUGEPAGE) };
        // SAFETY: `len` bytes mapped, readable and writable, ours alone; 8-byte aligned (a page).
        let words = unsafe { std::slice::from_raw_parts_mut(ptr.cast::<u64>(), len / 8) };
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for w in words.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *w = x;
        }
        Ok(Payload { ptr: ptr.cast(), len })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `len` bytes mapped and filled in `new`, unmapped only on drop.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for Payload {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer borrowed.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// BUFFER as (the senders' SO_SNDBUF, the receiver's SO_RCVBUF), 0 for the kernel's autotuning:
/// `N` for both, `N/auto` for the send buffer alone.
fn buffers(arg: &str) -> Option<(usize, usize)> {
    match arg.strip_suffix("/auto") {
        Some(send) => Some((send.parse().ok()?, 0)),
        None => arg.parse().ok().map(|n| (n, n)),
    }
}

fn send(bytes: u64, streams: usize, (buffer, receive_buffer): (usize, usize), wake: &str, span: usize) -> Result<f64, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args(["receive", &streams.to_string(), &receive_buffer.to_string(), wake])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the receiver: {e}"))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line).map_err(|e| e.to_string())?;
    let port: u16 = line.trim().parse().map_err(|_| format!("the receiver said {line:?}, not a port"))?;
    let mut conns = Vec::with_capacity(streams);
    for _ in 0..streams {
        let sock = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
        set_buffer(&sock, libc::SO_SNDBUF, buffer);
        conns.push(sock);
    }
    let payload = std::sync::Arc::new(Payload::new(span)?);
    let share = bytes / streams as u64;
    let first = conns[0].try_clone().map_err(|e| e.to_string())?;
    let started = Instant::now();
    let senders: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(index, mut sock)| {
            let payload = payload.clone();
            thread::spawn(move || -> std::io::Result<()> {
                let memory = payload.bytes();
                // Each stream reads its own part of the span (the whole of it, in turn, when its
                // share is larger), as each stream of a migration sends other pages.
                let mut at = (index as u64 * share % memory.len() as u64) as usize / CHUNK * CHUNK;
                let mut left = share;
                while left > 0 {
                    let n = left.min(CHUNK as u64) as usize;
                    if at + n > memory.len() {
                        at = 0;
                    }
                    sock.write_all(&memory[at..at + n])?;
                    at += n;
                    left -= n as u64;
                }
                sock.shutdown(Shutdown::Write)
            })
        })
        .collect();
    for s in senders {
        s.join().map_err(|_| "a sender thread panicked".to_string())?.map_err(|e| format!("send: {e}"))?;
    }
    let mut answer = [0u8; 8];
    (&first).read_exact(&mut answer).map_err(|e| format!("the receiver did not answer: {e}"))?;
    let seconds = started.elapsed().as_secs_f64();
    let status = child.wait().map_err(|e| e.to_string())?;
    let got = u64::from_le_bytes(answer);
    if !status.success() || got != share * streams as u64 {
        return Err(format!("the receiver got {got} of {} bytes ({status})", share * streams as u64));
    }
    Ok(got as f64 / seconds / (1u64 << 30) as f64)
}

/// This process's peak resident memory since it was executed (`VmHWM`), where /proc has it.
fn peak_resident_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number = |i: usize| args.get(i).and_then(|a| a.parse::<u64>().ok());
    // WAKE: `any` (the default) or `whole`; anything else is refused.
    let wake = |i: usize| match args.get(i).map(String::as_str) {
        None | Some("any") => Some("any"),
        Some("whole") => Some("whole"),
        Some(_) => None,
    };
    let usage = "usage: tcp_ceiling BYTES STREAMS BUFFER [any|whole [SPAN]] (BUFFER 0: kernel autotuning, N/auto: the send \
                 buffer alone; whole: reads wait for a whole MiB; SPAN: bytes of memory the senders read, 1 MiB by default)";
    let result = match args.first().map(String::as_str) {
        Some("receive") => match (number(1), number(2), wake(3)) {
            (Some(streams), Some(buffer), Some(wake)) if streams > 0 => {
                receive(streams as usize, buffer as usize, wake == "whole").map(|()| None)
            }
            _ => Err("receive STREAMS BUFFER [any|whole]".into()),
        },
        _ => match (
            number(0),
            number(1),
            args.get(2).and_then(|a| buffers(a)),
            wake(3),
            args.get(4).map_or(Some(CHUNK as u64), |_| number(4)),
        ) {
            (Some(bytes), Some(streams), Some(buffers), Some(wake), Some(span)) if streams > 0 && bytes > 0 && span > 0 => {
                send(bytes, streams as usize, buffers, wake, (span as usize).div_ceil(CHUNK) * CHUNK).map(Some)
            }
            _ => Err(usage.into()),
        },
    };
    match result {
        Ok(Some(rate)) => {
            println!("gib_per_s={rate:.4}");
            if let Some(kib) = peak_resident_kib() {
                println!("sender_peak_kib={kib}");
            }
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tcp_ceiling: {err}");
            ExitCode::FAILURE
        }
    }
}
