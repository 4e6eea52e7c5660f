"""Reliability III: user input on the newer surfaces (diffusers teachers, edit inputs, call options,
on-policy, presets, --lora-targets) is refused in one line naming it, before Ray or a model load
where possible; a flag that cannot apply is refused, one that can applies; quoted input stays short;
third-party chatter stays off stderr."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest

from arcflow.core.errors import one_line
from cli_helpers import assert_one_line_error, assert_process_failed_one_line, raises_one_line
from cli_helpers import run_in_process as cli
from cli_helpers import run_subprocess

#: An error line quoting 100 KB of input stays about this short.
SHORT_LINE = 400


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` (its pixel data is a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory) -> Path:
    from tiny_pipelines import save_tiny_flux_pipeline

    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("teachers") / "flux")


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "p.txt"
    path.write_text("a red circle\n")
    return path


# -- class 6: quoted input is capped ----------------------------------------------------------------
def test_one_line_cuts_every_long_word_and_the_line():
    line = one_line(f"bad path {'/x' * 50_000}\nand   {'y' * 150} stays")
    assert len(line) < SHORT_LINE and "(100000 characters)" in line and "y" * 150 in line
    assert len(one_line(" ".join(["word"] * 1000))) <= 1000


def test_long_inputs_are_quoted_short(tmp_path, capsys, tiny_flux):
    long_path = "/x" * 50_000
    code, _, err = cli(capsys, "sample", "--teacher", "digits", "--prompt", "0", "--image", long_path, "--out", tmp_path / "o.png")
    assert len(assert_one_line_error(code, err, "characters")) < SHORT_LINE
    bad_class = tmp_path / "pipe"
    bad_class.mkdir()
    (bad_class / "model_index.json").write_text(json.dumps({"_class_name": "A" * 100_000}))
    code, _, err = cli(capsys, "sample", "--teacher", bad_class, "--prompt", "x", "--out", tmp_path / "o.png")
    assert len(assert_one_line_error(code, err, "cannot drive", "(100000 characters)")) < SHORT_LINE
    code, _, err = cli(capsys, "generate-trajectories", "--out", tmp_path / "ds", "-n", "1", "--teacher", bad_class,
                       "--prompts", tmp_path / ("q" * 100_000))
    assert code == 2 and len(err) < SHORT_LINE, err


def test_a_long_lora_targets_value_is_quoted_short():
    from arcflow.distill.student import build_student
    from arcflow.distill.student.config import StudentConfig
    from arcflow.pipeline.registry import load_teacher

    message = raises_one_line(lambda: build_student(load_teacher("digits"), StudentConfig(lora_targets="x" * 100_000)),
                              "--lora-targets", "match no module", "(100000 characters)")
    assert len(message) < SHORT_LINE


def test_prompts_are_bounded_up_front(tmp_path, capsys, tiny_flux):
    huge = "a " * 1_000_000
    code, _, err = cli(capsys, "sample", "--teacher", tiny_flux, "--prompt", huge, "--out", tmp_path / "o.png")
    assert len(assert_one_line_error(code, err, "--prompt", "2000000 characters", "at most 10000")) < SHORT_LINE
    (tmp_path / "p.txt").write_text(f"fine\n{huge}\n")
    code, _, err = cli(capsys, "generate-trajectories", "--teacher", tiny_flux, "--prompts", tmp_path / "p.txt",
                       "-n", "1", "--out", tmp_path / "ds")
    assert_one_line_error(code, err, "p.txt line 2", "at most 10000")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": huge}) + "\n")
    code, _, err = cli(capsys, "distill", "--on-policy", "--teacher", tiny_flux, "--prompts", tmp_path / "p.jsonl",
                       "--out", tmp_path / "run")
    assert_one_line_error(code, err, "p.jsonl line 1", "at most 10000")
    assert not (tmp_path / "ds").exists() and not (tmp_path / "run").exists()


# -- class 3: internal errors become a line naming the input --------------------------------------
@pytest.mark.parametrize("size", [(60_000, 60_000), (12_000, 12_000), (9_000, 10)])
def test_oversized_images_are_refused_before_decoding(size, tmp_path, capsys):
    image = png_header(tmp_path / "big.png", *size)
    code, _, err = cli(capsys, "sample", "--teacher", "digits", "--prompt", "0", "--image", image, "--out", tmp_path / "o.png")
    assert_one_line_error(code, err, "big.png", "at most 8192 per side")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "x", "image": "big.png"}) + "\n")
    code, _, err = cli(capsys, "generate-trajectories", "--teacher", "digits", "--prompts", tmp_path / "p.jsonl",
                       "-n", "1", "--out", tmp_path / "ds")
    assert_one_line_error(code, err, "big.png", "at most 8192 per side")


def test_an_image_path_with_a_nul_byte_is_one_line(tmp_path, capsys):
    from arcflow.pipeline.edit_inputs import load_image

    raises_one_line(lambda: load_image("a\0b.png"), "NUL byte", "a\\x00b.png")
    code, _, err = cli(capsys, "sample", "--teacher", "digits", "--prompt", "0", "--image", "ref\0.png", "--out", tmp_path / "o.png")
    assert_one_line_error(code, err, "--image", "null byte")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "x", "image": "ref\0.png"}) + "\n")
    code, _, err = cli(capsys, "generate-trajectories", "--teacher", "digits", "--prompts", tmp_path / "p.jsonl",
                       "-n", "1", "--out", tmp_path / "ds")
    assert_one_line_error(code, err, "NUL byte", "ref\\x00.png")


@pytest.mark.parametrize("key, value, fragments", [
    ("max_sequence_length", "abc", ("max_sequence_length must be int", "'\"abc\"'")),
    ("max_sequence_length", "[", ("max_sequence_length must be int", "'\"[\"'")),
    ("max_sequence_length", "NaN", ("max_sequence_length", "numbers finite")),
    ("max_sequence_length", "1.5", ("must be int",)),
    ("joint_attention_kwargs", "[1]", ("joint_attention_kwargs must be dict",)),
    ("joint_attention_kwargs", '{"scale": Infinity}', ("numbers finite",)),
    ("pooled_prompt_embeds", "[[0.0]]", ("pooled_prompt_embeds", "derives this argument")),
    ("ip_adapter_image_embeds", "[]", ("ip_adapter_image_embeds", "derives this argument")),
    ("sigmas", "[1.0, 0.0]", ("arcflow sets this argument itself",)),
])
def test_call_option_values_are_checked_against_the_signature(key, value, fragments):
    import diffusers

    from arcflow.cli.dataset_commands import parse_call_options
    from arcflow.pipeline.call_options import check_call_options

    options = parse_call_options([f"{key}={value}"])
    raises_one_line(lambda: check_call_options(diffusers.FluxPipeline, options), f"--call-option {key}", *fragments)


def test_call_options_of_the_right_type_apply():
    import diffusers

    from arcflow.pipeline.call_options import check_call_options

    good = {"max_sequence_length": 64, "joint_attention_kwargs": {"scale": 1.0}, "negative_prompt_2": "blurry"}
    assert check_call_options(diffusers.FluxPipeline, good) == good
    assert check_call_options(diffusers.Flux2KleinPipeline, {"text_encoder_out_layers": [1]})
    assert check_call_options(diffusers.StableDiffusion3Pipeline, {"skip_layer_guidance_scale": 3, "clip_skip": None})


def test_call_options_of_a_pipeline_directory_are_checked_before_ray(tiny_flux, prompts, tmp_path, capsys):
    for args in (["generate-trajectories", "-n", "1", "--out", tmp_path / "ds"],
                 ["distill", "--on-policy", "--out", tmp_path / "run"]):
        code, _, err = cli(capsys, *args, "--teacher", tiny_flux, "--prompts", prompts,
                           "--call-option", "max_sequence_length=abc")
        assert_one_line_error(code, err, "--call-option max_sequence_length must be int")
    assert not (tmp_path / "ds").exists() and not (tmp_path / "run").exists()


def test_a_bad_lora_targets_regex_is_refused_before_ray(tmp_path, capsys):
    for pattern in ("blocks.(", "[a-", "*"):
        code, _, err = cli(capsys, "distill", "--on-policy", "--teacher", "digits", "--lora-targets", pattern,
                           "--out", tmp_path / "run")
        assert_one_line_error(code, err, "--lora-targets", "is not a regular expression")
    assert not (tmp_path / "run").exists()


def test_a_diffusers_teacher_without_prompts_is_one_line(tiny_flux, tmp_path, capsys):
    for args, flag in ((["generate-trajectories", "-n", "1", "--out", tmp_path / "ds"], "--prompts"),
                       (["distill", "--on-policy", "--out", tmp_path / "run"], "--prompts"),
                       (["sample", "--out", tmp_path / "o.png"], "--prompt")):
        code, _, err = cli(capsys, *args, "--teacher", tiny_flux)
        assert_one_line_error(code, err, f"{flag} is required", "prompt set of their own")
    for hub_id in ("black-forest-labs/FLUX.1-dev", "someone/anything"):
        code, _, err = cli(capsys, "sample", "--teacher", hub_id, "--out", tmp_path / "o.png")
        assert_one_line_error(code, err, "--prompt is required")


@pytest.mark.parametrize("extra", [["--call-option", "max_sequence_length=64"], ["--height", "64"], ["--torch-dtype", "float16"]])
def test_diffusers_options_on_an_on_policy_digits_run_are_one_line(extra, tmp_path, capsys):
    code, _, err = cli(capsys, "distill", "--on-policy", "--teacher", "digits", *extra, "--out", tmp_path / "run")
    assert_one_line_error(code, err, extra[0], "apply to diffusers teachers only")


# -- class 4: a flag that cannot apply is refused; one that can, applies ---------------------------
@pytest.mark.parametrize("args, fragments", [
    (["ds", "--teacher-mix-iters", "5"], ("--teacher-mix-iters", "only apply with --on-policy")),
    (["ds", "--intermediate-states", "2", "--mixture-dropout", "0.2"], ("--intermediate-states, --mixture-dropout",)),
    (["ds", "--window-substeps", "2"], ("--window-substeps",)),
    (["ds", "--height", "64"], ("--height", "only apply with --on-policy")),
    (["ds", "--call-option", "a=1"], ("--call-option", "only apply with --on-policy")),
    (["--on-policy", "--teacher", "digits", "--loader-workers", "2"], ("--loader-workers", "do not apply with --on-policy")),
    (["--on-policy", "--teacher", "digits", "--trainable", "heads", "--lora-rank", "4"], ("--lora-rank", "--trainable heads")),
    (["ds", "--trainable", "full", "--lora-targets", "x"], ("--lora-targets", "--trainable full")),
    (["--on-policy", "--teacher", "digits", "--preset", "official-"], ("--preset must be one of", "'official-'")),
    (["--on-policy", "--teacher", "digits", "--preset", "official-digitsx"], ("--preset must be one of",)),
    (["--on-policy", "--teacher", "digits", "--preset", "Official"], ("--preset must be one of",)),
])
def test_flags_that_cannot_apply_are_refused(args, fragments, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "distill", *args, "--out", tmp_path / "run")
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "run").exists()


def test_a_polish_refuses_student_flags_that_differ_from_its_run(tmp_path, capsys):
    from arcflow.distill.presets import build_config
    from arcflow.distill.student.config import StudentConfig
    from arcflow.distill.student.saving import CONFIG_FORMAT, CONFIG_VERSION

    run = tmp_path / "parent"
    run.mkdir()
    student = StudentConfig(k=8, lora_rank=4).to_dict()
    (run / "arcflow_config.json").write_text(json.dumps({
        "format": CONFIG_FORMAT, "format_version": CONFIG_VERSION, "teacher": {"id": "digits"}, "student": student}))
    for flag, value in (("--k", "4"), ("--lora-rank", "8"), ("--momentum", None), ("--weight-groups", "2")):
        code, _, err = cli(capsys, "distill", "--on-policy", "--from", run, flag, *([value] if value else []),
                           "--out", tmp_path / "run")
        assert_one_line_error(code, err, flag, "a polish keeps the run's student")
    same = build_config({"on_policy": True, "from_run": str(run), "out": "x", "k": 8, "lora_rank": 4})
    assert same.from_run == str(run)


@pytest.mark.parametrize("targets, wrapped", [(".*", 47), (["to_q"], 4), (r"transformer_blocks\.0\.attn\.to_(q|k)", 2)])
def test_lora_targets_that_name_linear_layers_apply(targets, wrapped):
    from arcflow.distill.student import build_student
    from arcflow.distill.student.config import StudentConfig
    from arcflow.pipeline.registry import load_teacher

    student = build_student(load_teacher("digits"), StudentConfig(lora_targets=targets))
    names = [n for n, m in student.transformer.named_modules() if hasattr(m, "lora_A")]
    assert len(names) == wrapped and not any(n.startswith("proj_out") for n in names)


@pytest.mark.parametrize("targets, fragments", [
    ("proj_out", ("match only the output projection proj_out", "momentum head replaces")),
    ("proj_out.*", ("match only the output projection",)),
    ("norm_out", ("match no linear layer", "AdaLayerNormContinuous")),
    ("no_such", ("match no module of the FluxTransformer2DModel",)),
])
def test_lora_targets_that_cannot_apply_say_why_without_a_repr(targets, fragments):
    from arcflow.distill.student import build_student
    from arcflow.distill.student.config import StudentConfig
    from arcflow.pipeline.registry import load_teacher

    message = raises_one_line(lambda: build_student(load_teacher("digits"), StudentConfig(lora_targets=targets)),
                              f"--lora-targets {targets!r}", *fragments)
    assert not any(f"{kind}(" in message for kind in ("Linear", "Dropout", "AdaLayerNormContinuous", "MomentumHead"))


# -- class 2: third-party chatter stays off stderr --------------------------------------------------
def test_a_non_flow_pipeline_teacher_is_exactly_one_line(tmp_path):
    pipe = tmp_path / "sd"
    pipe.mkdir()
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    res = run_subprocess("sample", "--teacher", pipe, "--prompt", "x", "--out", tmp_path / "o.png", timeout=300)
    assert_process_failed_one_line(res, "cannot drive a StableDiffusionPipeline", "not a flow-matching pipeline")


def test_a_hub_id_without_network_is_exactly_one_line(tmp_path):
    res = run_subprocess("sample", "--teacher", "someone/no-such-pipeline", "--prompt", "x", "--out", tmp_path / "o.png",
                         env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}, timeout=300)
    assert_process_failed_one_line(res, "could not fetch teacher 'someone/no-such-pipeline'")


def test_sampling_a_tiny_pipeline_directory_says_nothing_on_stderr(tiny_flux, tmp_path):
    image = tmp_path / "ref.png"
    from PIL import Image

    Image.new("RGB", (16, 16), "red").save(image)
    res = run_subprocess("sample", "--teacher", tiny_flux, "--prompt", "a red circle", "--image", image,
                         "--out", tmp_path / "o.png", "--num", "1", "--steps", "2", timeout=300)
    assert_process_failed_one_line(res, "takes no reference images")
    ok = run_subprocess("sample", "--teacher", tiny_flux, "--prompt", "a red circle", "--out", tmp_path / "o.png",
                        "--num", "1", "--steps", "2", timeout=300)
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr
    verbose = run_subprocess("--verbose", "sample", "--teacher", tiny_flux, "--prompt", "a red circle",
                             "--out", tmp_path / "o.png", "--num", "1", "--steps", "2", timeout=300)
    assert verbose.returncode == 0 and "Loading pipeline components" in verbose.stderr, "--verbose shows them again"
