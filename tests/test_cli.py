"""Every command: --help, a short run, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from suder.cli import main

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["backbones", "world", "world export", "pretrain", "generate", "caption", "eval", "report", "run"]


def _suder(*args, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "suder", *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _one_line_error(proc, text):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: ") and text in lines[0], proc.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command.split(), "--help"])
    assert exc.value.code == 0
    assert "usage: suder" in capsys.readouterr().out


def test_world_export(tmp_path):
    assert main(["world", "export", "--num", "3", "--seed", "1", "--out", str(tmp_path / "w")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "w" / "captions.jsonl").read_text().splitlines()]
    assert [r["image"] for r in rows] == ["00000.png", "00001.png", "00002.png"]
    assert all((tmp_path / "w" / r["image"]).exists() for r in rows)


def test_pretrain_generate_caption_eval(tmp_path, tiny_toy_path):
    assert main(["pretrain", "--backbone", "toy", "--out", str(tmp_path / "m"), "--steps", "2"]) == 0
    assert (tmp_path / "m" / "model.safetensors").exists()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red square", "tag": "single"}\n{"prompt": "two blue circles"}\n')
    out = tmp_path / "gen"
    assert (
        main(
            [
                "generate",
                "--backbone",
                "toy",
                "--model",
                tiny_toy_path,
                "--prompts",
                str(prompts),
                "--num-samples",
                "2",
                "--seed",
                "0",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads((out / "00000" / "metadata.jsonl").read_text()) == {"prompt": "a red square", "tag": "single"}
    assert sorted(p.name for p in (out / "00001" / "samples").iterdir()) == ["0000.png", "0001.png"]
    main(["world", "export", "--num", "3", "--seed", "1", "--out", str(tmp_path / "w")])
    (tmp_path / "w" / "captions.jsonl").unlink()
    caps = tmp_path / "caps.jsonl"
    assert (
        main(
            [
                "caption",
                "--backbone",
                "toy",
                "--model",
                tiny_toy_path,
                "--images",
                str(tmp_path / "w"),
                "--out",
                str(caps),
            ]
        )
        == 0
    )
    rows = [json.loads(x) for x in caps.read_text().splitlines()]
    assert [r["image"] for r in rows] == ["00000.png", "00001.png", "00002.png"] and all("caption" in r for r in rows)
    again = tmp_path / "caps2.jsonl"
    main(
        ["caption", "--backbone", "toy", "--model", tiny_toy_path, "--images", str(tmp_path / "w"), "--out", str(again)]
    )
    assert again.read_text() == caps.read_text()  # greedy by default: the same captions every time
    proc = _suder("eval", "--backbone", "toy", "--model", tiny_toy_path, "--num", "8", "--json")
    result = json.loads(proc.stdout)
    assert set(result["t2i"]) >= {"single", "pair", "count", "relation", "overall"} and "caption_greedy" in result


def test_run_short(tmp_path, tiny_toy_path):
    proc = _suder(
        "run",
        "--model",
        tiny_toy_path,
        "--output-dir",
        str(tmp_path / "r"),
        "--steps",
        "1",
        "--group-size",
        "2",
        "--gen-batch-size",
        "2",
        "--und-batch-size",
        "2",
        "--eval-num",
        "4",
    )
    assert "before" in proc.stdout and "after" in proc.stdout
    assert json.loads((tmp_path / "r" / "run.json").read_text())["steps"] == 1


def test_bad_inputs_are_one_line_errors(tmp_path, tiny_toy_path):
    _one_line_error(_suder("eval", "--backbone", "toy", "--model", str(tmp_path / "nope"), check=False), "No toy model")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _one_line_error(
        _suder(
            "generate",
            "--backbone",
            "toy",
            "--model",
            tiny_toy_path,
            "--prompts",
            str(empty),
            "--out",
            str(tmp_path / "g"),
            check=False,
        ),
        "has no prompts",
    )
    bad = tmp_path / "imgs"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    _one_line_error(
        _suder(
            "caption",
            "--backbone",
            "toy",
            "--model",
            tiny_toy_path,
            "--images",
            str(bad),
            "--out",
            str(tmp_path / "c.jsonl"),
            check=False,
        ),
        "Cannot read image",
    )
    _one_line_error(
        _suder("run", "--strategy", "unified", "--algo", "simpo", "--group-size", "1", check=False),
        "group_size must be >= 2",
    )
    yaml = tmp_path / "run.yaml"
    yaml.write_text("learning_rate: 0.1\n")
    _one_line_error(_suder("run", "--config", str(yaml), check=False), "Unknown config key 'learning_rate'")


# ------------------------------------------------------------------------------------------- bad inputs
# Each row: (id, argv with {placeholders}, a fragment of the one-line error). {m} is a real saved model, {p} a
# good prompt file, {i} a good image folder, {latin1} a prompt file that is not UTF-8, {file} a plain file,
# {broken} a folder with an unreadable image, {t} the test's folder.
BAD_INPUTS = [
    (
        "generate-num-samples-0",
        "generate --backbone toy --model {m} --prompts {p} --num-samples 0 --out {t}/out",
        "--num-samples is 0, but it counts the images drawn per prompt and must be at least 1",
    ),
    (
        "generate-num-samples-negative",
        "generate --backbone toy --model {m} --prompts {p} --num-samples -3 --out {t}/out",
        "--num-samples is -3",
    ),
    (
        "generate-not-utf8",
        "generate --backbone toy --model {m} --prompts {latin1} --out {t}/out",
        "latin1.txt' is not UTF-8 text (byte 3: invalid continuation byte)",
    ),
    (
        "generate-missing-prompts",
        "generate --backbone toy --model {m} --prompts {t}/nope.txt --out {t}/out",
        "does not exist",
    ),
    (
        "generate-out-under-a-file",
        "generate --backbone toy --model {m} --prompts {p} --out {file}/out",
        "plain.txt' is a file, not a folder",
    ),
    (
        "generate-unknown-backbone",
        "generate --backbone showo2 --model {m} --prompts {p} --out {t}/out",
        "Unknown backbone 'showo2'. Available: ",
    ),
    (
        "generate-not-an-int",
        "generate --backbone toy --prompts {p} --num-samples two --out {t}/out",
        "argument --num-samples: invalid int value: 'two'; see `suder generate --help`",
    ),
    (
        "generate-unknown-option",
        "generate --backbone toy --prompts {p} --out {t}/out --samples 2",
        "unrecognized arguments: --samples 2",
    ),
    ("pretrain-steps-negative", "pretrain --out {t}/out --steps -5", "--steps is -5, but it counts optimizer steps"),
    ("pretrain-steps-0", "pretrain --out {t}/out --steps 0", "--steps is 0"),
    ("pretrain-out-is-a-file", "pretrain --out {file} --steps 2", "plain.txt' as the --out folder: it is a file"),
    ("pretrain-out-under-a-file", "pretrain --out {file}/sub --steps 2", "is a file, not a folder"),
    ("pretrain-unknown-backbone", "pretrain --backbone tyo --out {t}/out --steps 2", "Did you mean 'toy'?"),
    ("world-export-num-0", "world export --num 0 --out {t}/out", "--num is 0, but it counts the scenes to write"),
    ("world-export-num-negative", "world export --num -2 --out {t}/out", "--num is -2"),
    ("world-export-out-under-a-file", "world export --num 2 --out {file}/w", "is a file, not a folder"),
    (
        "caption-batch-size-0",
        "caption --backbone toy --model {m} --images {i} --batch-size 0 --out {t}/out.jsonl",
        "--batch-size is 0",
    ),
    (
        "caption-temperature-negative",
        "caption --backbone toy --model {m} --images {i} --temperature -1 --out {t}/c",
        "--temperature is -1, but it must be >= 0",
    ),
    (
        "caption-unreadable-image",
        "caption --backbone toy --model {m} --images {broken} --out {t}/out.jsonl",
        "broken.png' (UnidentifiedImageError): it is not an image file PIL can open",
    ),
    (
        "caption-missing-images",
        "caption --backbone toy --model {m} --images {t}/nope --out {t}/out.jsonl",
        "Image folder",
    ),
    (
        "caption-images-is-a-file",
        "caption --backbone toy --model {m} --images {file} --out {t}/out.jsonl",
        "is a file, not a folder",
    ),
    (
        "caption-out-is-a-folder",
        "caption --backbone toy --model {m} --images {i} --out {i}",
        "is a folder; pass the path of the .jsonl file",
    ),
    (
        "caption-out-under-a-file",
        "caption --backbone toy --model {m} --images {i} --out {file}/c.jsonl",
        "plain.txt' as the folder of --out: it is a file",
    ),
    ("eval-num-negative", "eval --model {m} --num -4", "--num is -4, but it counts the prompts and scenes judged"),
    ("eval-num-0", "eval --model {m} --num 0", "--num is 0"),
    ("eval-missing-model", "eval --model {t}/nope --num 4", "No toy model at"),
    ("eval-unknown-backbone", "eval --backbone no-such-thing --model {m}", "Unknown backbone 'no-such-thing'"),
    ("run-unknown-backbone", "run --backbone no-such-thing", "Unknown backbone 'no-such-thing'. Available: "),
    ("run-output-dir-under-a-file", "run --output-dir {file}/run", "plain.txt' is a file"),
    ("run-not-utf8", "run --model {m} --prompts {latin1} --output-dir {t}/out", "latin1.txt' is not UTF-8 text"),
    ("run-no-images", "run --model {m} --images {t}/nope --output-dir {t}/out", "nope' does not exist"),
    (
        "run-options-no-space",
        "run --model {m} --backbone-options {{lora:true}} --output-dir {t}/out",
        "'lora:true' reads as one key with no value; put a space after the colon: \"{lora: true}\"",
    ),
    ("run-options-not-a-mapping", "run --model {m} --backbone-options lora --output-dir {t}/out", "must be a mapping"),
    (
        "run-options-unquoted",  # the shell splits {lora: true} into two words
        "run --model {m} --backbone-options {{lora: true}} --output-dir {t}/out",
        "--backbone-options got '{lora:' and 'true}' as separate words: quote the mapping, as in --backbone-options "
        "'{lora: true}'.",
    ),
    (
        "run-group-size-not-a-number",
        "run --model {m} --group-size four --output-dir {t}/out",
        "group_size in command-line flags must be an integer, got 'four'.",
    ),
    (
        "run-yaml-group-size-not-a-number",
        "run --config {four} --model {m} --output-dir {t}/out",
        "four.yaml must be an integer, got 'four'.",
    ),
    ("run-unknown-option", "run --grup-size 4 --output-dir {t}/out", "Did you mean '--group-size'?"),
    ("run-unknown-section-option", "run --gen.grup-size 4", "Did you mean '--gen.group-size'?"),
    ("run-option-without-value", "run --model {m} --lr", "Option '--lr' needs a value."),
    ("run-flag-with-a-value", "run --overwrite=maybe", "--overwrite is a flag: write --overwrite or --no-overwrite"),
    ("run-stray-word", "run --model {m} extra", "Unexpected argument 'extra'"),
    ("run-bad-choice", "run --model {m} --und.algo ppo --output-dir {t}/out", "und.algo must be one of simpo, grpo"),
]


@pytest.fixture
def bad_files(tmp_path, tiny_toy_path):
    from suder.worlds import shapes

    (tmp_path / "latin1.txt").write_bytes("caf\xe9 a red square\n".encode("latin-1"))
    (tmp_path / "plain.txt").write_text("a file, not a folder\n")
    (tmp_path / "p.txt").write_text("a red square\n")
    (tmp_path / "four.yaml").write_text("group_size: four\n")
    shapes.export(2, 0, tmp_path / "images")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "broken.png").write_bytes(b"not a png")
    return {
        "m": tiny_toy_path,
        "p": tmp_path / "p.txt",
        "i": tmp_path / "images",
        "latin1": tmp_path / "latin1.txt",
        "file": tmp_path / "plain.txt",
        "broken": tmp_path / "broken",
        "t": tmp_path,
        "four": tmp_path / "four.yaml",
    }


@pytest.fixture
def nothing_expensive(monkeypatch):
    """Building or loading a model, pre-training, training, evaluating or exporting fails the test."""
    import suder.evaluate
    import suder.pretrain
    import suder.trainer
    from suder.backbones.toy import ToyUnifiedLM
    from suder.worlds import shapes

    def expensive(*args, **kwargs):
        raise AssertionError("expensive work started before the bad input was reported")

    for owner, name in [
        (suder.pretrain, "pretrain"),
        (suder.pretrain, "ensure_toy_base"),
        (suder.trainer, "train"),
        (suder.evaluate, "evaluate"),
        (shapes, "export"),
        (ToyUnifiedLM, "__init__"),
    ]:
        monkeypatch.setattr(owner, name, expensive)


@pytest.mark.parametrize("argv,fragment", [pytest.param(a, f, id=i) for i, a, f in BAD_INPUTS])
def test_bad_input_is_one_line_before_expensive_work(argv, fragment, bad_files, nothing_expensive, capsys):
    args = [a.format(**bad_files) for a in argv.split()]
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err and out == ""
    assert not (bad_files["t"] / "out").exists()  # nothing was created either


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["pretrain", "--out", "{t}/out", "--steps", "-5"], "--steps is -5"),
        (["generate", "--backbone", "toy", "--prompts", "{latin1}", "--out", "{t}/out"], "is not UTF-8 text"),
        (["world", "export", "--num", "0", "--out", "{t}/out"], "--num is 0"),
        (
            ["run", "--backbone", "no-such-thing"],
            "Unknown backbone 'no-such-thing'. Available: ",  # + the built-ins and any installed plugins
        ),
        (["caption", "--backbone", "toy", "--images", "{i}", "--batch-size", "x", "--out", "c"], "invalid int value"),
    ],
)
def test_bad_input_in_a_real_process(argv, fragment, bad_files):
    """The installed entry point: exit code 2 and one line on stderr, no traceback."""
    proc = _suder(*(a.format(**bad_files) for a in argv), check=False)
    _one_line_error(proc, fragment)
    assert "Traceback" not in proc.stderr


def test_python_m_suder_cli_is_one_line(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "suder.cli", "world", "export", "--num", "-1", "--out", str(tmp_path / "w")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    _one_line_error(proc, "--num is -1")
    assert not (tmp_path / "w").exists()


class _Exited(Exception):
    pass


@pytest.mark.parametrize(
    ("several", "argv", "code"),
    [(True, ["backbones"], 0), (True, ["world", "export", "--num", "-1", "--out", "w"], 2), (False, ["backbones"], 0)],
)
def test_a_process_of_several_ends_its_group_and_leaves_without_teardown(tmp_path, monkeypatch, several, argv, code):
    """Under torchrun / accelerate launch the CLI ends the process group, then (one process of several) leaves with
    os._exit and its exit code, on success and on a one-line error alike; a one-process group is ended and main
    returns. The group here is a real gloo one; only its reported size is made 2."""
    import torch.distributed as dist

    import suder.cli

    def exit_(status):
        raise _Exited(status)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        if several:
            monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
        monkeypatch.setattr(suder.cli.os, "_exit", exit_)
        if several:
            with pytest.raises(_Exited) as left:
                main(argv)
            assert left.value.args == (code,)
        else:
            assert main(argv) == code
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ensure_writable_dir(tmp_path):
    from suder.data import ensure_writable_dir
    from suder.errors import DataError

    target = tmp_path / "a" / "b"
    assert ensure_writable_dir(target, create=False) == target and not target.exists()
    assert ensure_writable_dir(target).is_dir()
    (tmp_path / "f").write_text("")
    with pytest.raises(DataError, match=r"Cannot use '.*f/x' as the --output-dir folder: '.*f' is a file"):
        ensure_writable_dir(tmp_path / "f" / "x", "--output-dir folder")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(DataError, match="is not writable"):
            ensure_writable_dir(ro / "x", create=False)


# ------------------------------------------------------------------------------------------- progress
def _plain_console(width: int = 40):
    import io

    from rich.console import Console

    return Console(file=io.StringIO(), force_terminal=False, width=width)


def test_progress_is_plain_lines_when_not_a_terminal():
    from suder.console import LineProgress
    from suder.console import progress as _progress

    console = _plain_console()
    now = [0.0]
    bar = _progress(console)
    assert isinstance(bar, LineProgress)
    bar.clock = lambda: now[0]
    with bar:
        task = bar.add_task("pretrain", total=200, info="")
        for step in range(1, 201):
            now[0] += 0.5
            bar.update(task, completed=step, info=f"loss {1 / step:.3f}")
    lines = console.file.getvalue().splitlines()
    assert len(lines) == 10, lines  # every 10%, no more; narrow consoles do not truncate
    assert lines[0] == "pretrain: 20/200 (10%)  elapsed 0:00:10  loss 0.050"
    assert lines[-1] == "pretrain: 200/200 (100%)  elapsed 0:01:40  loss 0.005"
    # a task without a total (and a slow one) prints every every_seconds; hidden tasks print nothing
    console = _plain_console()
    with LineProgress(console, every_seconds=30, clock=lambda: now[0]) as bar:
        hidden = bar.add_task("pretrain base", total=None, info="", visible=False)
        task = bar.add_task("dsr", total=None, info="")
        for step in range(1, 101):
            now[0] += 1.0
            bar.update(hidden, completed=step)
            bar.update(task, completed=step, info="gen r=-1.00")
        bar.update(task, total=101, completed=101)
    lines = console.file.getvalue().splitlines()
    assert [line.split("  ")[0] for line in lines] == ["dsr: 30", "dsr: 60", "dsr: 90", "dsr: 101/101 (100%)"]


def test_progress_is_a_bar_on_a_terminal():
    from rich.console import Console
    from rich.progress import Progress

    from suder.console import progress as _progress

    assert isinstance(_progress(Console(force_terminal=True)), Progress)


def test_pretrain_progress_in_a_pipe(tmp_path):
    """`suder pretrain ... 2> log`: readable progress lines with the step, total and loss; nothing wraps."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, suder.pretrain as p, tests.test_cli as t; p.pretrain = t._fake_pretrain;"
            "from suder.cli import main; sys.exit(main(sys.argv[1:]))",
            "pretrain",
            "--out",
            str(tmp_path / "m"),
            "--steps",
            "20",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("pretrain: 2/20 (10%)  elapsed 0:00:0") and lines[0].endswith("loss 0.500"), lines
    assert lines[9].startswith("pretrain: 20/20 (100%)") and len(lines) == 11 and lines[10].startswith("Saved to")


def _fake_pretrain(backbone, *, out, steps, seed, callback):
    import suder.pretrain

    for step in range(1, steps + 1):
        callback({"step": step, "total_steps": steps, "loss": 1.0 / step})
    return suder.pretrain.PretrainResult(None, out, 1.0, [1.0 / steps])


# ------------------------------------------------------------------------------------------- generated options
def test_run_help_lists_every_setting_with_its_help_and_default(capsys):
    """`suder run --help` is generated from the config: every setting (sections as --gen.x / --und.x), its help
    text and its default, in groups."""
    from suder.config import FIELDS

    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # the help is wrapped in boxes: compare words
    out = out.replace("│", " ")
    out = " ".join(out.split())
    for key, f in FIELDS.items():
        assert f"--{key.replace('_', '-')}" in out, key
        words = " ".join(f.metadata["help"].split()[:4])
        assert words in out, (key, words)
    for group in ("model", "data", "length", "optimiser", "simpo", "grpo", "rewards", "sampling", "logging", "gen"):
        assert f"{group} options" in out, group
    assert "--lr FLOAT learning rate (AdamW) (default: 3e-06)" in out
    assert "--gen.group-size INT" in out and "(default: group_size)" in out
    assert "--gradient-checkpointing, --no-gradient-checkpointing" in out and "--output-dir" in out


def test_run_flags_are_typed_flags_and_sections():
    from suder.cli import parse_run

    config, flags = parse_run(
        ["--gradient-checkpointing", "--bf16", "--gen.group-size", "16", "--group-size", "4", "--out", "r",
         "--und-reward-scorer", "frozen", "--resume", "--lr=1e-5", "--config", "c.yaml"]
    )
    assert config == "c.yaml"
    assert flags == {"gradient_checkpointing": True, "mixed_precision": "bf16", "gen.group_size": "16",
                     "group_size": "4", "output_dir": "r", "und.reward_scorer": "frozen", "resume": "true",
                     "lr": "1e-5"}
    assert parse_run(["--resume", "auto", "--no-overwrite"])[1] == {"resume": "auto", "overwrite": False}
    assert parse_run([]) == (None, {})  # the embedded default


@pytest.mark.parametrize("command", ["world export", "pretrain", "generate", "caption", "report", "run"])
def test_every_command_writes_to_output_dir(command, capsys):
    with pytest.raises(SystemExit):
        main([*command.split(), "--help"])
    out = capsys.readouterr().out
    assert "--output-dir" in out and "--out" in out


def test_version_and_env():
    import suder.cli

    proc = _suder("--version")
    assert proc.stdout.strip() == f"suder {suder.cli._version()}" and suder.cli._version() != "unknown"
    env = _suder("env").stdout
    for key in ("suder", "Python", "torch", "transformers", "accelerate", "deepspeed", "Devices", "Backbones"):
        assert f"- {key}: " in env, key
    backbones = env.split("- Backbones: ")[1]
    assert "toy (suder " in backbones and "janus-pro (suder " in backbones
