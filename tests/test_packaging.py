"""The built wheel: a non-editable install finds its shipped configs (the demo's default among them); the CLI's help."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_installed_wheel_finds_the_demo_config(tmp_path):
    before = own_install(tmp_path)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "wheel"), str(REPO)], check=True, cwd=tmp_path)
    wheel = next((tmp_path / "wheel").glob("latentflow-*.whl"))
    prefix = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(prefix)], check=True)
    # --ignore-installed: without it pip uninstalls this environment's latentflow before installing elsewhere
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--ignore-installed",
                    "--prefix", str(prefix), str(wheel)], check=True)
    # the new environment's own latentflow (from the wheel); its dependencies from this one
    environment = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    probe = ("import latentflow.demo as d, sys; "
             "print(d.DEFAULT_CONFIG); print(d.__file__); print(sys.prefix)")
    found, module, env_prefix = subprocess.run(
        [str(prefix / "bin" / "python"), "-c", probe], capture_output=True, text=True, check=True,
        env=environment, cwd=tmp_path,
    ).stdout.split()
    assert Path(module).is_relative_to(prefix.resolve()) or Path(module).is_relative_to(prefix)
    assert Path(found) == Path(env_prefix) / "share" / "latentflow" / "configs" / "flowers64_demo.yaml"
    assert Path(found).read_text() == (REPO / "configs" / "flowers64_demo.yaml").read_text()
    assert (Path(env_prefix) / "share" / "latentflow" / "configs" / "accelerate" / "cpu_2proc.yaml").is_file()
    assert own_install(tmp_path) == before  # this environment's own latentflow left alone


def own_install(cwd: Path) -> str:
    """Where this environment imports latentflow from (run outside the repository)."""
    probe = [sys.executable, "-c", "import latentflow; print(latentflow.__file__)"]
    return subprocess.run(probe, capture_output=True, text=True, check=True, cwd=cwd).stdout.strip()


def test_every_commands_help_states_each_default_once_and_no_empty_one():
    from latentflow.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, command in commands.items():
        text = " ".join(command.format_help().split())  # argparse wraps lines anywhere
        for empty in ("(default: None)", "(default: [])", "(default: True)", "(default: False)"):
            assert empty not in text, (name, empty)
        for option in text.split(" --"):
            assert option.count("default") <= 1 + option.count("defaults"), (name, option)
        bare = [action.dest for action in command._actions if not action.help]  # argparse shows no default then
        assert bare == [], (name, bare)
    sample = " ".join(commands["sample"].format_help().split())
    assert "(default: the pipeline's)" in sample and "number of images (default: 64)" in sample
    for name, shown in (("encode", "(default: stabilityai/sd-vae-ft-mse)"), ("ot-fit", "(default: 1000)"),
                        ("plot-log", "(default RUN_DIR/log.png)")):  # every command shows its defaults
        assert shown in " ".join(commands[name].format_help().split()), name
