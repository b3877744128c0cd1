"""Metadata you can trust: forged and damaged checkpoints are refused by field, before anything
exists; keyed checkpoints (HMAC-SHA256) refuse any change a forger makes, and restore exactly.

Every forgery here is made as a forger would make it: change a field (or a section), then
recompute every unkeyed checksum the format documents (section checksums, the .kern checksum,
the section lists, ``meta_checksum``), so only the checks that read what the fields mean, or the
MAC, can refuse it. Each case runs ``vmmrun -r`` and must end with exit status 4, one message on
stderr naming the file and the field, no traceback, no control socket and no console file.
"""

import json
import os
import re
import shutil
import struct
import subprocess

import pytest

from vmmpy import _core
from vmmpy.cli import vmmrun
from vmmpy.snapshot import meta as ckmeta
from vmmpy.state.kernel import KERNEL_NAMES

from .procs import start_vmmrun, stop, vmmctl, vmmrun_cmd, wait_for_socket, wait_for_state, write_key
from .test_checkpoint_restore import flip

MiB = 1 << 20
ABTEST = ["--guest", "abtest", "--guest-arg", "sweeps=400", "--guest-arg", "report=50", "-m", "32M"]
PAGES = (32 * MiB - 2 * MiB) // 4096
EXPECTED_CONSOLE = "".join(f"abtest: sweep {n}\n" for n in range(50, 401, 50)) + (
    f"abtest: done 400 sweeps over {PAGES} pages, all counters 400\n"
)
KEY = b"0123456789abcdef-checkpoint-key"
OTHER_KEY = b"fedcba9876543210-another-key"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One guest, paused mid-run, checkpointed with a key and then suspended without one: two
    checkpoints of the same instant, and the console it had written by then."""
    directory = tmp_path_factory.mktemp("forgery")
    write_key(directory / "ckp.key", KEY + b"\n")
    console = directory / "console.log"
    proc = start_vmmrun(directory, *ABTEST, "-l", f"com1,{console}", "--pause-at=5000000", "src0")
    try:
        wait_for_socket(directory, "src0", proc)
        wait_for_state(directory, "src0", "paused")
        keyed = vmmctl(directory, "--vm=src0", f"--checkpoint={directory / 'keyed.ckp'}", "--key-file", str(directory / "ckp.key"))
        assert keyed.returncode == 0, keyed.stderr
        assert "(keyed: HMAC-SHA256)" in keyed.stdout
        plain = vmmctl(directory, "--vm=src0", f"--suspend={directory / 'plain.ckp'}")
        assert plain.returncode == 0, plain.stderr
        assert proc.wait(timeout=60) == 0
    finally:
        stop(proc)
    return directory


def copy_checkpoint(src, dst_dir, name="bad.ckp"):
    dst = dst_dir / name
    for suffix in ("", ".kern", ".meta"):
        shutil.copyfile(f"{src}{suffix}", f"{dst}{suffix}")
    return dst


# -- the forger's tools: the format as docs/checkpoint-format.md describes it -------------------


def load_meta(ckp):
    return json.loads(open(f"{ckp}.meta").read())


def save_meta(ckp, meta):
    meta["meta_checksum"] = ckmeta.meta_checksum(meta)
    with open(f"{ckp}.meta", "w") as f:
        json.dump(meta, f, indent=1)


def change_meta(change):
    def forge(ckp):
        meta = load_meta(ckp)
        change(meta)
        save_meta(ckp, meta)

    return forge


def replace_meta_text(old, new, count=1):
    """Edit the .meta as text (for what json.dump cannot write); its checksum is left as is."""

    def forge(ckp):
        text = open(f"{ckp}.meta").read()
        assert old in text, old
        with open(f"{ckp}.meta", "w") as f:
            f.write(text.replace(old, new, count))

    return forge


def kern_records(data):
    """(name bytes, version, payload bytes) of every section in a .kern container."""
    magic, _, count = struct.unpack_from("<8sII", data, 0)
    assert magic == b"VMMPYSEC"
    offset, out = 16, []
    for _ in range(count):
        (name_len,) = struct.unpack_from("<H", data, offset)
        name = data[offset + 2 : offset + 2 + name_len]
        offset += 2 + name_len
        version, length, _ = struct.unpack_from("<IQQ", data, offset)
        offset += 20
        out.append([name, version, data[offset : offset + length]])
        offset += length
    return out


def build_kern(records, *, container_version=1, count=None, trailer=b""):
    parts = [struct.pack("<8sII", b"VMMPYSEC", container_version, len(records) if count is None else count)]
    table = []
    for name, version, payload in records:
        offset = sum(len(p) for p in parts)
        checksum = _core.xxh3_64(name + struct.pack("<IQ", version, len(payload)) + payload)
        parts.append(struct.pack("<H", len(name)) + name + struct.pack("<IQQ", version, len(payload), checksum) + payload)
        table.append({"name": name.decode(errors="replace"), "version": version, "offset": offset,
                      "size": len(parts[-1]), "checksum": f"{checksum:016x}"})
    return b"".join(parts) + trailer, table


def forge_kern(change, **build):
    """Change the .kern's records, then recompute everything unkeyed that vouches for them."""

    def forge(ckp):
        records = kern_records(open(f"{ckp}.kern", "rb").read())
        change(records)
        data, table = build_kern(records, **build)
        open(f"{ckp}.kern", "wb").write(data)
        meta = load_meta(ckp)
        meta["kern"].update(size=len(data), checksum=f"{_core.xxh3_64(data):016x}")
        meta["sections"] = table
        kern = [e for e in table if e["name"] in KERNEL_NAMES]
        meta["kern_structs"] = [{"device": e["name"], "size": e["size"], "file_offset": e["offset"]} for e in kern]
        meta["devices"] = [{"device": e["name"], "size": e["size"], "file_offset": e["offset"]} for e in table if e not in kern]
        save_meta(ckp, meta)

    return forge


def payload_of(name, change):
    def edit(records):
        record = next(r for r in records if r[0] == name.encode())
        record[2] = change(record[2])

    return edit


def json_edit(change):
    def edit(payload):
        value = json.loads(payload)
        change(value)
        return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()

    return edit


def drop_section(name):
    def edit(records):
        records[:] = [r for r in records if r[0] != name.encode()]

    return edit


def rename_section(old, new):
    def edit(records):
        next(r for r in records if r[0] == old.encode())[0] = new

    return edit


def move_to_kern_structs(meta):
    meta["kern_structs"].append(meta["devices"].pop(0))


DEEP = "[" * 100_000 + "]" * 100_000

# (id, forgery, what the message must say after "checkpoint '...bad.ckp.meta': " or ".kern': ")
CASES = [
    # wrong types at every level
    ("slots-as-lists", change_meta(lambda m: m["basic metadata"]["devices_config"].update(slots=[["hostbridge"], ["lpc"]])),
     ".meta", r"field 'basic metadata\.devices_config\.slots\[0\]' must be a string of 1 to 255 characters, got a list of 1"),
    ("slots-as-object", change_meta(lambda m: m["basic metadata"]["devices_config"].update(slots={"a": 1})),
     ".meta", r"field 'basic metadata\.devices_config\.slots' must be a list, got an object"),
    ("lpc-unknown", change_meta(lambda m: m["basic metadata"]["devices_config"].update(lpc=["com9"])),
     ".meta", r"field 'basic metadata\.devices_config\.lpc\[0\]' must be one of 'com1', 'com2', got the string 'com9'"),
    ("ncpus-as-string", change_meta(lambda m: m["basic metadata"].update(ncpus="1")),
     ".meta", r"field 'basic metadata\.ncpus' must be an integer from 1 to 1024, got the string '1'"),
    ("ncpus-as-bool", change_meta(lambda m: m["basic metadata"].update(ncpus=True)),
     ".meta", r"field 'basic metadata\.ncpus' must be an integer from 1 to 1024, got true"),
    ("ncpus-over-max-vcpus", change_meta(lambda m: m["basic metadata"].update(ncpus=17)),
     ".meta", r"field 'basic metadata\.ncpus' must be an integer from 1 to 16, got the integer 17"),
    ("vendor-unknown", change_meta(lambda m: m["basic metadata"].update(vendor="arm")),
     ".meta", r"field 'basic metadata\.vendor' must be one of 'intel', 'amd', got the string 'arm'"),
    ("negative-memsize", change_meta(lambda m: m["basic metadata"].update(memsize=-33554432)),
     ".meta", r"field 'basic metadata\.memsize' must be an integer from 4096 to \d+, a multiple of 4096, got the integer -33554432"),
    ("negative-lowmem", change_meta(lambda m: m["memory"].update(lowmem=-4096)),
     ".meta", r"field 'memory\.lowmem' must be an integer from 0 to \d+, a multiple of 4096, got the integer -4096"),
    ("huge-memsize", change_meta(lambda m: m["basic metadata"].update(memsize=1 << 80)),
     ".meta", r"field 'basic metadata\.memsize' must be an integer from 4096 to 70368744177664, .*got the integer 1208925819614629174706176"),
    ("huge-literal", replace_meta_text('"memflags": 0', '"memflags": ' + "9" * 5000),
     ".meta", r"not valid JSON \(Exceeds the limit \(4300 digits\)"),
    ("float-chunk-size", change_meta(lambda m: m["memory"].update(chunk_size=4194304.0)),
     ".meta", r"field 'memory\.chunk_size' must be an integer .*got the number 4194304\.0"),
    ("kern-size-as-string", change_meta(lambda m: m["kern"].update(size="5668")),
     ".meta", r"field 'kern\.size' must be an integer from 1 to \d+, got the string '5668'"),
    ("negative-section-offset", change_meta(lambda m: m["sections"][0].update(offset=-16)),
     ".meta", r"field 'sections\[0\]\.offset' must be an integer from 0 to \d+, got the integer -16"),
    ("section-version-zero", change_meta(lambda m: m["sections"][0].update(version=0)),
     ".meta", r"field 'sections\[0\]\.version' must be an integer from 1 to 4294967295, got the integer 0"),
    ("chunk-hash-not-hex", change_meta(lambda m: m["memory"]["chunk_hashes"].__setitem__(2, "zz" * 16)),
     ".meta", r"field 'memory\.chunk_hashes\[2\]' must be 32 lowercase hex digits, got the string 'zzzz"),
    ("writer-as-number", change_meta(lambda m: m.update(writer=7)),
     ".meta", r"field 'writer' must be a string of 1 to 200 characters, got the integer 7"),
    ("meta-not-an-object", lambda ckp: open(f"{ckp}.meta", "w").write("[1, 2]"),
     ".meta", r"metadata is a list of 2, expected a JSON object"),
    ("format-version-as-string", change_meta(lambda m: m.update(format_version="1")),
     ".meta", r"format version '1' is not one this vmmpy reads \(1, 2, 3, 4\)"),
    ("nan", replace_meta_text('"memflags": 0', '"memflags": NaN'),
     ".meta", r"NaN is not a JSON number"),
    ("repeated-key", replace_meta_text('"memflags": 0', '"memflags": 0, "memflags": 2'),
     ".meta", r"key 'memflags' appears twice in one object"),
    ("checksum-as-list", lambda ckp: json.dump({**load_meta(ckp), "meta_checksum": [1]}, open(f"{ckp}.meta", "w")),
     ".meta", r"metadata checksum mismatch \(stored a list of 1, computed '[0-9a-f]{16}'\)"),
    # missing keys and extra keys where the format has none
    ("missing-chunk-size", change_meta(lambda m: m["memory"].pop("chunk_size")),
     ".meta", r"field 'memory\.chunk_size' is missing"),
    ("missing-kern", change_meta(lambda m: m.pop("kern")),
     ".meta", r"field 'kern' is missing"),
    ("missing-slots", change_meta(lambda m: m["basic metadata"]["devices_config"].pop("slots")),
     ".meta", r"field 'basic metadata\.devices_config\.slots' is missing"),
    ("extra-top-level-key", change_meta(lambda m: m.update(trusted=True)),
     ".meta", r"field 'trusted' is not part of this format \(the top level has "),
    ("extra-memory-key", change_meta(lambda m: m["memory"].update(preload=1)),
     ".meta", r"field 'memory\.preload' is not part of this format \('memory' has "),
    ("extra-section-key", change_meta(lambda m: m["sections"][1].update(skip=True)),
     ".meta", r"field 'sections\[1\]\.skip' is not part of this format"),
    ("extra-kern-struct-key", change_meta(lambda m: m["kern_structs"][0].update(version=1)),
     ".meta", r"field 'kern_structs\[0\]\.version' is not part of this format"),
    ("extra-devices-config-key", change_meta(lambda m: m["basic metadata"]["devices_config"].update(pci=[])),
     ".meta", r"field 'basic metadata\.devices_config\.pci' is not part of this format"),
    ("unkeyed-with-a-mac", change_meta(lambda m: m.update(meta_mac="0" * 64)),
     ".meta", r"field 'meta_mac' is not part of this format"),
    # nesting and size, refused before parsing
    ("100k-nested-brackets", lambda ckp: open(f"{ckp}.meta", "w").write(DEEP),
     ".meta", r"arrays and objects nest more than the 16 levels allowed; the file is damaged"),
    ("deep-nesting-in-a-field", replace_meta_text('"memflags": 0', f'"memflags": 0, "note": {DEEP}'),
     ".meta", r"arrays and objects nest more than the 16 levels allowed"),
    ("meta-too-large", lambda ckp: os.truncate(f"{ckp}.meta", (64 << 20) + 1),
     ".meta", r"file is 67108865 bytes, more than the 67108864 a checkpoint's the metadata may be"),
    ("meta-is-a-fifo", lambda ckp: (os.unlink(f"{ckp}.meta"), os.mkfifo(f"{ckp}.meta")),
     ".meta", r"the metadata is not a regular file"),
    # the section lists must match the .kern file exactly, both ways
    ("empty-kern-structs", change_meta(lambda m: m.update(kern_structs=[])),
     ".meta", r"'kern_structs' does not match the sections of '.*bad\.ckp\.kern': it lacks \{'device': 'vm', .*\} and 9 more"),
    ("kern-structs-missing-one", change_meta(lambda m: m["kern_structs"].pop()),
     ".meta", r"'kern_structs' does not match the sections .*: it lacks \{'device': 'vpmtmr'"),
    ("kern-structs-with-a-device", change_meta(move_to_kern_structs),
     ".meta", r"'kern_structs' does not match the sections .*: entry 10 \(\{'device': 'lpc\.com1'.*\) is not in the file"),
    ("kern-struct-renamed", change_meta(lambda m: m["kern_structs"][3].update(device="vatpic")),
     ".meta", r"'kern_structs' does not match the sections .*: entry 3 is \{'device': 'vatpic'.*the file has \{'device': 'vioapic'"),
    ("devices-empty", change_meta(lambda m: m.update(devices=[])),
     ".meta", r"'devices' does not match the sections .*: it lacks \{'device': 'lpc\.com1'"),
    ("sections-version-differs", change_meta(lambda m: m["sections"][0].update(version=3)),
     ".meta", r"'sections' does not match the sections .*: entry 0 is \{'name': 'vm', 'version': 3"),
    ("sections-checksum-differs", change_meta(lambda m: m["sections"][3].update(checksum="0" * 16)),
     ".meta", r"'sections' does not match the sections .*: entry 3 is .*'checksum': '0000000000000000'"),
    # a recomputed unkeyed checksum over a changed field: the checks that read the field refuse it
    ("recomputed-checksum-ncpus", change_meta(lambda m: m["basic metadata"].update(ncpus=2)),
     ".kern", r"section 'vm' is for 1 vCPUs, the metadata \('.*bad\.ckp\.meta'\) says 2"),
    ("recomputed-checksum-highmem", change_meta(lambda m: m["memory"].update(highmem=4096)),
     ".meta", r"memory layout lowmem 33554432 \+ highmem 4096 does not fit memsize 33554432"),
    ("recomputed-checksum-lpc", change_meta(lambda m: m["basic metadata"]["devices_config"].update(lpc=[])),
     "", r"device 'com1' is configured here but was not saved \(remove its -l option\)"),
    # the .kern container and the payloads, every unkeyed checksum recomputed
    ("vm-payload-100k-nested", forge_kern(payload_of("vm", lambda p: DEEP.encode())),
     ".kern", r"section 'vm': payload is not valid state encoding \(arrays and objects nest more than the 64 levels allowed\)"),
    ("vm-payload-not-an-object", forge_kern(payload_of("vm", lambda p: b"[]")),
     ".kern", r"section 'vm': payload is a list, not a mapping"),
    ("vm-vendor-unknown", forge_kern(payload_of("vm", json_edit(lambda v: v.update(vendor="arm")))),
     ".kern", r"field 'vm\.vendor' must be one of 'intel', 'amd', got the string 'arm'"),
    ("vm-ncpus-as-string", forge_kern(payload_of("vm", json_edit(lambda v: v.update(ncpus="1")))),
     ".kern", r"field 'vm\.ncpus' must be an integer from 1 to 16, got the string '1'"),
    ("vm-section-missing", forge_kern(drop_section("vm")),
     ".kern", r"kernel section 'vm' is missing"),
    ("bytes-not-a-string", forge_kern(payload_of("lpc.com1", json_edit(lambda v: v.update(rx={"$bytes": 5})))),
     ".kern", r"section 'lpc\.com1': payload is not valid state encoding \(a \$bytes value must be a base64 string, not int\)"),
    ("section-name-not-utf8", forge_kern(rename_section("pm", b"p\xffm")),
     ".kern", r"section 12 of 14 has a name that is not UTF-8 \(b'p\\xffm'\)"),
    ("section-name-empty", forge_kern(rename_section("pm", b"")),
     ".meta", r"field 'devices\[2\]\.device' must be a string of 1 to 255 characters, got the string ''"),
    ("container-version", forge_kern(lambda r: None, container_version=2),
     ".kern", r"state container version 2 is not one this vmmpy reads \(1\)"),
    ("section-count-huge", forge_kern(lambda r: None, count=1 << 31),
     ".kern", r"2147483648 sections is more than the 4096 allowed"),
    ("bytes-after-the-last-section", forge_kern(lambda r: None, trailer=b"\0" * 8),
     ".kern", r"8 unexpected bytes after the last section"),
    # payload fields the restore itself reads: refused after the machine is built, but before
    # any console file is opened
    ("vm-last-tsc-as-string", forge_kern(payload_of("vm", json_edit(lambda v: v.update(last_tsc="abc")))),
     ".kern", r"section 'vm': last_tsc: expected a list, got 'abc'"),
    ("vcpu-register-too-large", forge_kern(payload_of("vmcx", json_edit(lambda v: v["vcpus"][0].update(format=1 << 70)))),
     ".kern", r"section 'vmcx': .*vcpu 0: 'format' must be an integer in 0\.\.2\*\*64, got 1180591620717411303424"),
    ("uart-register-as-string", forge_kern(payload_of("lpc.com1", json_edit(lambda v: v.update(ier="zz")))),
     ".kern", r"section 'lpc\.com1': ier: expected an int, got 'zz'"),
    ("kern-is-a-fifo", lambda ckp: (os.unlink(f"{ckp}.kern"), os.mkfifo(f"{ckp}.kern")),
     ".kern", r"the state file is not a regular file"),
]


def restore(ckp, run_dir, name, *extra):
    """vmmrun -r in this process: its exit status and what it printed (a traceback would raise)."""
    console = run_dir / f"{name}.console"
    status = vmmrun.main(["-r", str(ckp), "-l", f"com1,{console}", "--run-dir", str(run_dir), *extra, name])
    return status, console


@pytest.mark.parametrize("forge, suffix, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_forged_or_damaged_checkpoint_is_refused_by_field_and_nothing_is_created(saved, tmp_path, capsys, forge, suffix, message):
    bad = copy_checkpoint(saved / "plain.ckp", tmp_path)
    forge(bad)
    status, console = restore(bad, tmp_path, "forged0")
    out, err = capsys.readouterr()
    assert status == 4, err
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"vmmrun: checkpoint '{bad}{suffix}': "), err
    assert re.search(message, lines[0]), err
    assert not (tmp_path / "forged0.ctl").exists(), "no control socket"
    assert not console.exists(), "no console file"


def test_the_unforged_copy_restores(saved, tmp_path):
    """The control for the table above: the same copy, unchanged, restores and runs to the end."""
    good = copy_checkpoint(saved / "plain.ckp", tmp_path, "good.ckp")
    console = tmp_path / "good.log"
    shutil.copyfile(saved / "console.log", console)
    result = subprocess.run(vmmrun_cmd("-r", str(good), "-l", f"com1,{console}", "--run-dir", str(tmp_path), "good0"),
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 1, result.stderr
    assert console.read_text() == EXPECTED_CONSOLE


@pytest.mark.parametrize("case", ["slots-as-lists", "100k-nested-brackets", "empty-kern-structs"])
def test_vmmrun_refuses_a_forged_checkpoint_as_a_process(saved, tmp_path, case):
    """The same refusals from a real vmmrun: exit status 4, one line on stderr, nothing left."""
    forge, suffix, message = next(c[1:] for c in CASES if c[0] == case)
    bad = copy_checkpoint(saved / "plain.ckp", tmp_path)
    forge(bad)
    console = tmp_path / "console.log"
    result = subprocess.run(vmmrun_cmd("-r", str(bad), "-l", f"com1,{console}", "--run-dir", str(tmp_path), "proc0"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 4
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "proc0.ctl").exists() and not console.exists()


# -- keyed checkpoints ---------------------------------------------------------------------------


def key_file(tmp_path, key=KEY):
    path = tmp_path / "given.key"
    write_key(path, key)
    return str(path)


@pytest.mark.covers(operation="checkpoint", guest="abtest", via="cli", key=True, restore="{mode}")
@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_a_keyed_checkpoint_restores_with_its_key_and_the_guest_ends_as_an_uninterrupted_run(saved, tmp_path, mode):
    ckp = copy_checkpoint(saved / "keyed.ckp", tmp_path, "keyed.ckp")
    meta = load_meta(ckp)
    assert meta["format_version"] == 2 and len(meta["meta_mac"]) == 64
    assert len(meta["memory"]["chunk_sha256"]) == len(meta["memory"]["chunk_hashes"]) and "sha256" in meta["kern"]
    console = tmp_path / "keyed.log"
    shutil.copyfile(saved / "console.log", console)
    result = subprocess.run(
        vmmrun_cmd("-r", str(ckp), "--restore-mode", mode, "--key-file", key_file(tmp_path), "-l", f"com1,{console}",
                   "--run-dir", str(tmp_path), "keyed0"),
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 1, result.stderr
    assert console.read_text() == EXPECTED_CONSOLE


def strip_mac(ckp):
    meta = load_meta(ckp)
    del meta["meta_mac"], meta["kern"]["sha256"], meta["memory"]["chunk_sha256"]
    meta["format_version"] = 1
    save_meta(ckp, meta)


KEYED_CASES = [
    # (id, forgery, key given, file suffix, message)
    ("no-key-given", lambda ckp: None, None,
     ".meta", r"this checkpoint is keyed \(its metadata carries an HMAC-SHA256\): give the key it was written with \(--key-file FILE\)"),
    ("another-key", lambda ckp: None, OTHER_KEY,
     ".meta", r"metadata MAC mismatch: the checkpoint was changed after it was written, or it was written with another key"),
    ("forged-field-recomputed-checksum", change_meta(lambda m: m["basic metadata"].update(vmname="someone-else")), KEY,
     ".meta", r"metadata MAC mismatch"),
    ("forged-section-every-checksum-recomputed", forge_kern(payload_of("vm", json_edit(lambda v: v.update(last_tsc=[0])))), KEY,
     ".meta", r"metadata MAC mismatch"),
    ("forged-slots-recomputed-checksum", change_meta(lambda m: m["basic metadata"]["devices_config"].update(slots=[["x"]])), KEY,
     ".meta", r"metadata MAC mismatch"),
    ("mac-stripped-to-look-unkeyed", strip_mac, KEY,
     ".meta", r"this checkpoint has no MAC \(format version 1, written without a key\), so the key cannot authenticate it"),
    ("mac-as-a-number", change_meta(lambda m: m.update(meta_mac=5)), KEY,
     ".meta", r"field 'meta_mac' must be 64 lowercase hex digits, got the integer 5"),
    ("mac-missing", change_meta(lambda m: m.pop("meta_mac")), KEY,
     ".meta", r"field 'meta_mac' must be 64 lowercase hex digits, got null"),
    ("kern-byte-flipped", lambda ckp: flip(f"{ckp}.kern", 100), KEY,
     ".kern", r"SHA-256 does not match the metadata's: the file was changed or damaged after the checkpoint was written"),
    ("memory-byte-flipped-lazy", lambda ckp: flip(ckp, 5 * MiB + 7), KEY,
     "", r"memory chunk 1 \(file bytes 0x400000\.\.0x800000, guest-physical 0x400000\.\.0x800000\) does not match its recorded SHA-256"),
]


@pytest.mark.parametrize("forge, key, suffix, message", [c[1:] for c in KEYED_CASES], ids=[c[0] for c in KEYED_CASES])
def test_a_keyed_checkpoint_refuses_any_forgery_and_a_missing_or_wrong_key(saved, tmp_path, capsys, forge, key, suffix, message):
    bad = copy_checkpoint(saved / "keyed.ckp", tmp_path)
    forge(bad)
    extra = ["--restore-mode", "lazy"] + (["--key-file", key_file(tmp_path, key)] if key else [])
    status, console = restore(bad, tmp_path, "keyed1", *extra)
    out, err = capsys.readouterr()
    assert status == 4, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"vmmrun: checkpoint '{bad}{suffix}': "), err
    assert re.search(message, err), err
    assert not (tmp_path / "keyed1.ctl").exists() and not console.exists()


def test_an_unkeyed_checkpoint_given_a_key_is_refused_as_unauthenticated(saved, tmp_path, capsys):
    status, console = restore(saved / "plain.ckp", tmp_path, "plain1", "--key-file", key_file(tmp_path))
    err = capsys.readouterr().err
    assert status == 4
    assert "has no MAC (format version 1, written without a key), so the key cannot authenticate it" in err
    assert not console.exists()


def test_without_a_key_a_lazy_restore_maps_a_flipped_memory_byte_that_a_keyed_one_refuses(saved, tmp_path):
    """What the key adds to memory: lazy restore cannot check XXH3 hashes without reading all
    memory, but a keyed checkpoint's SHA-256 digests are checked first, in either mode."""
    from vmmpy.snapshot import CheckpointError, read_checkpoint, restore_memory
    from vmmpy.state import SectionRegistry

    registry = SectionRegistry({s["name"].split("@")[0]: s["version"] for s in load_meta(saved / "plain.ckp")["sections"]})
    plain = copy_checkpoint(saved / "plain.ckp", tmp_path, "plain.ckp")
    keyed = copy_checkpoint(saved / "keyed.ckp", tmp_path, "keyed.ckp")
    for ckp in (plain, keyed):
        flip(ckp, 5 * MiB + 7)
    memory = restore_memory(read_checkpoint(plain, registry), "lazy")
    memory.close()
    with pytest.raises(CheckpointError, match=r"memory chunk 1 .* does not match its recorded SHA-256"):
        restore_memory(read_checkpoint(keyed, registry, key=KEY), "lazy")


def test_a_short_key_is_refused_before_anything_is_asked_or_written(tmp_path, capsys):
    short = key_file(tmp_path, b"too-short")
    result = vmmctl(tmp_path, "--vm=nobody", f"--checkpoint={tmp_path / 'x.ckp'}", "--key-file", short)
    assert result.returncode == 2
    assert f"--key-file {short}: a key needs at least 16 bytes, this has 9" in result.stderr
    assert not list(tmp_path.glob("x.ckp*"))
    status = vmmrun.main(["-r", str(tmp_path / "x.ckp"), "--key-file", short, "--run-dir", str(tmp_path), "short0"])
    assert status == 4
    assert "a key needs at least 16 bytes, this has 9" in capsys.readouterr().err


def test_a_key_with_nothing_to_authenticate_is_refused(tmp_path, capsys):
    status = vmmrun.main(["--guest", "abtest", "--key-file", key_file(tmp_path), "--run-dir", str(tmp_path), "nokey0"])
    assert status == 4
    assert "--key-file goes with -r FILE (a keyed checkpoint) or -R HOST:PORT (a migration)" in capsys.readouterr().err
