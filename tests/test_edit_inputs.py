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
