"""The command-line tools' shared parts: train.py's flags, the XLA:CPU restart, one line and status 2 for bad input.

The tools stand side by side on the library; these tests also check that no
tool imports another.
"""

import contextlib
import io
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from diffusion import cli, configs, cpu
from diffusion.errors import ConfigError, InputError, UsageError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train  # noqa: E402


def test_command_line_flags_override_the_preset(tmp_path):
    config = cli.config_from_flags(
        ["--preset", "tiny", "--channel-mult", "1,2", "--learning-rate", "1e-3", "--min-snr-gamma", "2.5"]
    )
    assert config == configs.make_config("tiny", channel_mult=(1, 2), learning_rate=1e-3, min_snr_gamma=2.5)
    assert cli.config_from_flags([]) == configs.Config()  # the default is the cpu preset
    with pytest.raises(UsageError, match="unrecognized arguments: --bogus"):
        cli.config_from_flags(["--bogus", "1"])
    with pytest.raises(ConfigError, match="nothing to resume"):
        cli.config_from_flags(["--resume", "--runs-dir", str(tmp_path)])
    text = cli.config_from_flags(["--preset", "text-tiny", "--text-width", "16", "--prompt-dropout", "0.2"])
    assert text == configs.make_config("text-tiny", text_width=16, prompt_dropout=0.2)
    with pytest.raises(UsageError, match="unrecognized arguments: --text-width"):
        cli.config_from_flags(["--preset", "tiny", "--text-width", "16"])  # a label preset has no text fields


def run_main(main, *argv):
    """A CLI's main(argv) in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "tiny", "--learning-rate", "-1"], "learning_rate must be a positive number"),
        (["--preset", "huge"], "argument --preset: invalid choice"),
        (["--steps", "many"], "argument --steps: invalid int value"),
        (["--resume", "--name", "never-ran"], "nothing to resume"),
    ],
)
def test_train_py_reports_bad_input_in_one_line_with_status_2(argv, message, tmp_path):
    code, stdout, stderr = run_main(train.main, *argv, "--runs-dir", tmp_path)
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and re.search(message, stderr), stderr
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_runs_dir_that_is_a_file_is_one_line_not_a_traceback(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    code, _, stderr = run_main(train.main, "--preset", "tiny", "--runs-dir", tmp_path / "file")
    assert code == 2 and stderr == f"error: {tmp_path / 'file'} is a file, not a folder: choose another --runs-dir " \
                                   "or --name\n"


def test_run_main_maps_the_error_family_and_nothing_else():
    def failing(error):
        def main(argv):
            raise error

        return main

    quiet = contextlib.redirect_stderr(io.StringIO())
    with quiet:
        assert cli.run_main(failing(InputError("bad"))) == 2
        assert cli.run_main(failing(FileNotFoundError(2, "No such file", "x.png"))) == 2
        assert cli.run_main(failing(FloatingPointError("diverged"))) == 1
        assert cli.run_main(failing(KeyboardInterrupt())) == 130
    with pytest.raises(ZeroDivisionError):  # a bug is not bad input: it keeps its traceback
        cli.run_main(failing(ZeroDivisionError()))


def test_every_input_error_of_the_library_is_one_family():
    from diffusion import errors

    for name in ("ConfigError", "CheckpointError", "DataError", "GenerationError", "ClassifierError", "UsageError"):
        assert issubclass(getattr(errors, name), errors.InputError), name
    assert issubclass(errors.InputError, ValueError)


def test_command_line_tools_import_only_the_library():
    tools = [*REPO.glob("*.py"), *REPO.glob("benchmarks/*.py"), *REPO.glob("scripts/*.py")]
    pattern = re.compile(r"^\s*(from|import) (train|sample|evaluate)\b", re.M)
    assert [str(p.relative_to(REPO)) for p in tools if pattern.search(p.read_text())] == []


def test_cpu_configure_sets_the_flag_once_and_refuses_after_jax(monkeypatch):
    # In this process JAX is already imported: the flag could no longer take effect.
    with pytest.raises(RuntimeError, match="before jax is imported"):
        cpu.configure()
    script = "import os; from diffusion import cpu; cpu.configure(); cpu.configure(); print(os.environ['XLA_FLAGS'])"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [cpu.YNN_FLAG]
    mine = "--xla_cpu_experimental_ynn_fusion_type=default"  # a user's own value wins
    out = subprocess.run([sys.executable, "-c", script], env={**env, "XLA_FLAGS": mine}, capture_output=True,
                         text=True, check=True)
    assert out.stdout.split() == [mine]


@pytest.mark.skipif(sys.platform != "linux", reason="the restart is for glibc on Linux only")
def test_train_py_restarts_itself_once_with_huge_pages_unless_told_otherwise(tmp_path):
    script = tmp_path / "restart.py"
    script.write_text(
        textwrap.dedent("""
            import os, sys
            print("run", os.getpid(), sys.flags.optimize, os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
            from diffusion import cpu
            cpu.restart_with_huge_pages()
            print("done", os.environ.get("GLIBC_TUNABLES"))
        """)
    )
    command = [sys.executable, "-O", str(script), "--steps", "3"]  # an interpreter option and arguments to keep
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}

    def output_lines(env):
        result = subprocess.run(command, env=env, capture_output=True, text=True, check=True, timeout=300)
        return result.stdout.split("\n")

    lines = output_lines(env)
    first, second = lines[0].split(" ", 3), lines[1].split(" ", 3)
    assert first[0] == second[0] == "run" and first[1] == second[1]  # the same process, run twice
    assert first[2:] == ["1", "None ['--steps', '3']"]
    assert second[2:] == ["1", "glibc.malloc.hugetlb=1 ['--steps', '3']"]
    assert lines[2:] == ["done glibc.malloc.hugetlb=1", ""]
    # Already set (here to nothing, the way to opt out): no restart.
    assert [line.split(" ")[0] for line in output_lines({**env, "GLIBC_TUNABLES": ""})] == ["run", "done", ""]
