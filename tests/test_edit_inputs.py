"""Prompts with reference images: JSON Lines files, the canonical prompt string, one-line errors."""

import json

import pytest
from PIL import Image

from arcflow.core.errors import ArcflowError
from arcflow.pipeline.edit_inputs import edit_prompt, has_images, parse_prompt
from arcflow.pipeline.generation_config import read_prompts


@pytest.fixture
def images(tmp_path):
    (tmp_path / "refs").mkdir()
    for name, color in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (16, 12), color).save(tmp_path / "refs" / name)
    return tmp_path


def test_jsonl_prompts_resolve_images_against_the_file(images):
    path = images / "prompts.jsonl"
    path.write_text(
        json.dumps({"prompt": "make it red", "image": "refs/a.png"}) + "\n\n"
        + json.dumps({"prompt": "swap them", "image": ["refs/a.png", str(images / "refs" / "b.png")]}) + "\n"
    )
    prompts = read_prompts(str(path))
    assert [parse_prompt(p) for p in prompts] == [
        ("make it red", [str(images / "refs" / "a.png")]),
        ("swap them", [str(images / "refs" / "a.png"), str(images / "refs" / "b.png")]),
    ]
    assert has_images(prompts) and not has_images(["a plain prompt", '{"prompt": "x"}'])
    # The canonical string is stable (datasets dedupe rows and hash prompts by it) and a plain
    # prompt stays itself, even one that looks like JSON.
    assert prompts[0] == edit_prompt("make it red", [str(images / "refs" / "a.png")])
    assert edit_prompt("plain", []) == "plain" and parse_prompt('{"prompt": 1}') == ('{"prompt": 1}', [])


@pytest.mark.parametrize("line, fragment", [
    ("not json", "line 1 is not JSON"),
    ('["a list"]', 'expected an object with a "prompt" string'),
    ('{"prompt": "x", "mask": "m.png"}', "unknown keys mask"),
    ('{"prompt": "x", "image": 3}', '"image" must be a path or a list of paths'),
    ('{"prompt": "x", "image": "refs/missing.png"}', "image not found"),
    ('{"prompt": "x", "image": "prompts.jsonl"}', "cannot read image"),
])
def test_bad_jsonl_is_one_line(images, line, fragment):
    path = images / "prompts.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ArcflowError) as info:
        read_prompts(str(path))
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_an_empty_jsonl_file_is_refused(images):
    path = images / "prompts.jsonl"
    path.write_text("\n \n")
    with pytest.raises(ArcflowError, match="empty"):
        read_prompts(str(path))


@pytest.mark.parametrize("args, fragment", [
    (["--prompt", "make it red", "--image", "missing.png"], "image not found"),
    (["--prompt", "make it red", "--image", "prompts.jsonl"], "cannot read image"),
    (["--image", "refs/a.png"], "--image needs --prompt"),
])
def test_sample_image_errors_are_one_line(images, args, fragment, capsys, monkeypatch):
    from cli_helpers import assert_one_line_error, run_in_process

    monkeypatch.chdir(images)
    (images / "prompts.jsonl").write_text("{}\n")
    code, _, err = run_in_process(capsys, "sample", "--out", str(images / "x.png"), *args)
    assert_one_line_error(code, err, fragment)
    assert not (images / "x.png").exists()


# A line of a plain-text prompts file that would read back as an edit prompt (not as itself).
EDIT_LOOKING = ['{"prompt": "x", "image": ["/etc/passwd"]}', '{"prompt": "x", "image": []}',
                '{"prompt":"x","image":["a.png","b.png"]}']


@pytest.mark.parametrize("line", EDIT_LOOKING)
@pytest.mark.parametrize("name", ["prompts.txt", "prompts.json", "prompts"])
def test_a_plain_text_prompts_file_is_plain_text(line, name, tmp_path, monkeypatch):
    from arcflow.pipeline import edit_inputs

    monkeypatch.setattr(edit_inputs, "check_image", lambda p: pytest.fail(f"opened {p}"))
    path = tmp_path / name
    path.write_text(f"a handwritten digit 3\n{line}\n")
    with pytest.raises(ArcflowError) as info:
        read_prompts(str(path))
    assert f"{path} line 2 is a JSON edit prompt" in str(info.value) and ".jsonl" in str(info.value)


def test_json_that_is_no_edit_prompt_stays_a_plain_prompt(tmp_path):
    lines = ['{"prompt": 1}', '["a list"]', '{"prompt": "x"}', '{"prompt": "x", "image": 3}', "{not json"]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(lines) + "\n")
    prompts = read_prompts(str(path))
    assert prompts == lines and not has_images(prompts)


@pytest.mark.parametrize("prompt", EDIT_LOOKING)
def test_sample_prompt_is_plain_text(prompt, tmp_path, capsys):
    from cli_helpers import assert_one_line_error, run_in_process

    code, _, err = run_in_process(capsys, "sample", "--prompt", prompt, "--out", str(tmp_path / "x.png"))
    assert_one_line_error(code, err, "--prompt", "is a JSON edit prompt")
    assert not (tmp_path / "x.png").exists()


def test_on_policy_prompts_are_plain_text_before_anything_starts(tmp_path, capsys):
    from cli_helpers import assert_one_line_error, run_in_process

    path = tmp_path / "prompts.txt"
    path.write_text(EDIT_LOOKING[0] + "\n")
    code, _, err = run_in_process(capsys, "distill", "--on-policy", "--teacher", "digits", "--prompts", path,
                                  "--out", tmp_path / "run")
    assert_one_line_error(code, err, "line 1 is a JSON edit prompt")
    assert not (tmp_path / "run").exists()
