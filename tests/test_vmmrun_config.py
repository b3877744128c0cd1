"""vmmrun -k FILE / -o KEY=VALUE: bhyve's configuration variables, in order, the command line winning."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vmmpy.cli import live_update, vmmrun
from vmmpy.runtime.config import ConfigError

from .procs import start_vmmrun, stop, vmmctl, wait_for_socket


def config_of(*argv: str):
    args = vmmrun.build_parser().parse_args(list(argv))
    from vmmpy.cli import vmmrun_config

    vmmrun_config.apply(args, vmmrun_config.read_sources(args.config_sources or []))
    return vmmrun.config_from_args(args)


def test_a_file_sets_a_guest_and_the_command_line_changes_one_thing(tmp_path):
    conf = tmp_path / "vm0.conf"
    conf.write_text(
        "# the usual setup of vm0\n"
        "name = vm0\n"
        "cpus=2\n"
        "memory.size=64M\n"
        "memory.wired=false\n"
        "lpc.com1.path=console.log\n"
        "pci.0.0.0.device=hostbridge\n"
        "pci.0.3.0.device=virtio-rnd\n"
        "pci.0.3.0.seed=7\n"
        "vmmpy.guest=abtest\n"
        "vmmpy.guest_arg.sweeps=3\n"
        "vmmpy.vendor=amd\n"
    )
    config = config_of("-k", str(conf), "-m", "32M", "--guest-arg", "sweeps=5")
    assert (config.name, config.ncpus, config.memsize, config.wired, config.vendor) == ("vm0", 2, 32 << 20, False, "amd")
    assert config.lpc["com1"] == "console.log" and config.guest == "abtest" and config.guest_args == {"sweeps": "5"}
    assert [(s.slot, s.emulation, s.conf) for s in config.slots] == [(0, "hostbridge", None), (3, "virtio-rnd", "seed=7")]


def test_k_and_o_apply_in_order_a_later_value_replacing_an_earlier(tmp_path):
    conf = tmp_path / "a.conf"
    conf.write_text("memory.size=64M\ncpus=2\n")
    assert config_of("-o", "memory.size=128M", "-k", str(conf), "vm1").memsize == 64 << 20
    assert config_of("-k", str(conf), "-o", "memory.size=128M", "vm1").memsize == 128 << 20
    assert config_of("-k", str(conf), "-o", "memory.size=128M", "-c", "3", "vm1").ncpus == 3


@pytest.mark.parametrize(("text", "error"), [
    ("memory.sise=64M\n", "a.conf:2: unknown key 'memory.sise' (known: name, cpus, memory.size"),
    ("memory.size\n", "a.conf:2: expected key=value"),
    ("memory.size=lots\n", "a.conf:2: memory.size 'lots' is not a size"),
    ("memory.wired=maybe\n", "a.conf:2: memory.wired must be true or false, got 'maybe'"),
    ("cpus=two\n", "a.conf:2: cpus must be a whole number, got 'two'"),
    ("vmmpy.tsc=sundial\n", "a.conf:2: vmmpy.tsc must be one of instructions, host, got 'sundial'"),
    ("vmmpy.idle=nap\n", "a.conf:2: vmmpy.idle must be one of sleep, skip, got 'nap'"),
    ("pci.0.3.0.path=disk.img\n", "a.conf:2: pci.0.3.0 has settings but no pci.0.3.0.device"),
])
def test_a_bad_line_is_refused_naming_the_file_the_line_and_the_key(tmp_path, text, error):
    conf = tmp_path / "a.conf"
    conf.write_text("# line 1\n" + text)
    with pytest.raises(ConfigError) as err:
        config_of("-k", str(conf), "vm2")
    assert str(err.value).startswith(str(tmp_path / error.split(":", 1)[0]) + ":" + error.split(":", 1)[1])


def test_idle_comes_from_a_file_or_the_command_line_and_a_live_update_keeps_it(tmp_path):
    assert config_of("--guest", "console", "vm4").idle == "sleep"
    assert config_of("-o", "vmmpy.idle=skip", "--guest", "console", "vm4").idle == "skip"
    assert config_of("-o", "vmmpy.idle=skip", "--idle", "sleep", "--guest", "console", "vm4").idle == "sleep"
    for argv, passed in ((["--idle", "skip"], ["--idle", "skip"]), ([], [])):
        args = vmmrun.build_parser().parse_args([*argv, "--guest", "console", "vm4"])
        successor = live_update.successor_argv(args, vmmrun.config_from_args(args), tmp_path / "vm4.mig", "vmmrun")
        # The default is left unsaid, so a default guest still updates to a build without --idle.
        assert [a for i, a in enumerate(successor) if "--idle" in successor[max(0, i - 1):i + 1]] == passed


def test_a_missing_file_and_a_bad_o_are_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"^-k .*nope\.conf: No such file or directory$"):
        config_of("-k", str(tmp_path / "nope.conf"), "vm3")
    with pytest.raises(ConfigError, match=r"^-o colour=blue: unknown key 'colour'"):
        config_of("-o", "colour=blue", "vm3")


def test_vmmrun_runs_the_guest_a_config_file_describes(tmp_path):
    conf = tmp_path / "cfg0.conf"
    conf.write_text("name=cfg0\nmemory.size=32M\ncpus=2\nvmmpy.guest=abtest\n")
    proc = start_vmmrun(tmp_path, "-k", str(conf))
    try:
        wait_for_socket(tmp_path, "cfg0", proc)
        status = json.loads(vmmctl(tmp_path, "--vm=cfg0", "--status", "--json").stdout)
        assert (status["memsize"], status["ncpus"]) == (32 << 20, 2)
    finally:
        stop(proc)
    refused = subprocess.run([sys.executable, "-m", "vmmpy.cli.vmmrun", "-o", "memory.size=64X", "--guest", "abtest", "x0"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 4 and refused.stderr.startswith("vmmrun: -o memory.size=64X: memory.size '64X' is not a size")
