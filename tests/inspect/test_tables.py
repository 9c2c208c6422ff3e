"""Every table at 80 and 100 columns and piped: no column left empty, no number cut
(issue 25); and summary and compare report one receptive field."""

from __future__ import annotations

import re

import pytest

from cnnlab import cli
from cnnlab.inspect.cache import models_table
from cnnlab.inspect.compare import compare, compare_table
from cnnlab.inspect.render import render_text
from cnnlab.inspect.specs import summarize_spec
from cnnlab.tables import Column, fit_table, render_plain
from cnnlab.tasks.classify import PER_CLASS_SHOWN, per_class_lines

WIDTHS = (80, 100, None)  # None: as wide as it needs (--wide)
CUT_NUMBER = re.compile(r"\d…|…\d|\d,…")


@pytest.fixture(scope="module")
def compared() -> list[dict]:
    return compare(["convnet", "resnet18"], input_size=(3, 64, 64))


def assert_fits(text: str, width: int | None, cells: list[tuple[str, ...]], hidden: list[str]):
    """No line past ``width``, nothing cut, and every cell of the columns shown is on the
    line of its row, whole."""
    assert "…" not in text and not CUT_NUMBER.search(text), text
    if width is not None:
        assert max(len(line) for line in text.splitlines()) <= width, text
    lines = text.splitlines()
    for row in cells:
        line = next(line for line in lines if f" {row[0]} " in line)  # the name column
        shown = [c for c in line.strip("│ ").split("│")]
        assert all(cell.strip() for cell in shown), f"an empty column in {line!r}"
        for cell in row:
            if cell not in hidden:
                assert cell in text


@pytest.mark.parametrize("width", WIDTHS)
def test_compare_fits_every_width_without_cutting(compared: list[dict], width) -> None:
    fitted = compare_table(compared, width)
    text = render_plain(fitted)
    assert_fits(text, width, [(r["model"], f"{r['params']:,}") for r in compared], [])
    if width == 80:
        assert fitted.hidden and "--wide shows all" in " ".join(text.split())
    if width is None:
        assert not fitted.hidden


@pytest.mark.parametrize("width", WIDTHS)
def test_models_table_fits_every_width(width) -> None:
    rows = [
        {"name": name, "family": "family_of_" + name, "task": "classify", "params": p,
         "macs": 7_610_000_000, "flops": 15_240_000_000, "input_size": [3, 224, 224],
         "min_size": 32}
        for name, p in (("densenet121", 7_978_856), ("densenet161", 28_681_000),
                        ("vgg19_bn", 143_678_248), ("alexnet_paper", 60_965_224))
    ]  # fmt: skip
    text = render_plain(models_table(rows, width))
    assert_fits(text, width, [(r["name"], f"{r['params']:,}") for r in rows], [])
    for name in ("densenet121", "densenet161"):  # not four rows of "densenet…"
        assert name in text


def test_the_name_column_and_numbers_survive_a_very_narrow_width() -> None:
    columns = [Column("name", "left"), Column("big"), Column("extra", drop=1)]
    rows = [("a_long_model_name", "138,357,544", "x" * 30)]
    fitted = fit_table("t", columns, rows, 40)
    assert fitted.hidden == ["extra"]
    text = render_plain(fitted)
    assert "a_long_model_name" in text and "138,357,544" in text


@pytest.mark.parametrize("width", WIDTHS)
def test_summary_fits_every_width(width) -> None:
    _, summary, _ = summarize_spec("convnet", depth=1)
    text = render_text(summary, width=width or 10_000)
    assert "…" not in text and not CUT_NUMBER.search(text)
    if width is not None:
        assert max(len(line) for line in text.splitlines()) <= width
    assert "3,363,786" in text and "features (Sequential)" in text


@pytest.mark.parametrize("width", WIDTHS)
def test_eval_per_class_table_fits_and_says_what_it_left_out(width) -> None:
    per_class = {
        f"class_with_a_long_name_{i:03d}": {
            "precision": 0.5 + i / 400, "recall": 0.25 + i / 300, "f1": i / 100, "support": 1000 + i
        }
        for i in range(60)
    }  # fmt: skip
    lines = per_class_lines(per_class, width)
    text = "\n".join(lines)
    shown = [name for name in per_class if name in text]
    assert shown == [f"class_with_a_long_name_{i:03d}" for i in range(PER_CLASS_SHOWN)]
    assert f"the {PER_CLASS_SHOWN} classes of 60 with the lowest F1" in text
    cells = [(n, f"{per_class[n]['precision']:.3f}", f"{per_class[n]['support']:,}") for n in shown]
    assert_fits(text, width, cells, [])


def test_piped_tables_are_80_columns(capsys, monkeypatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    assert cli.main(["compare", "convnet", "resnet18", "--input", "3,64,64"]) == 0
    text = capsys.readouterr().out
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "hidden at 80 columns" in text and "convnet" in text and "resnet18" in text


def test_summary_and_compare_give_one_receptive_field() -> None:
    for name in ("resnet18", "alexnet", "convnet"):
        _, summary, _ = summarize_spec(name, depth=1)
        (row,) = compare([name])
        assert (row["receptive_field"], row["output_stride"]) == (
            summary.receptive_field,
            summary.output_stride,
        )
        assert f"{summary.receptive_field:,.0f} px" in render_text(summary)
    _, resnet, _ = summarize_spec("resnet18")
    assert (resnet.receptive_field, resnet.output_stride) == (435, 32)  # not the pool's 627
    footer = " ".join(render_text(resnet).split())
    assert "every output sees the whole input" in footer
    avgpool = next(line for line in render_text(resnet).splitlines() if "avgpool" in line)
    assert " all " in avgpool


def test_a_pattern_filters_the_cached_whole_table(tmp_path, monkeypatch) -> None:
    import json

    import cnnlab.inspect.cache as cache

    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path))
    whole = [{"name": n, "params": i} for i, n in enumerate(("vgg11", "vgg11_bn", "resnet18"))]
    (tmp_path / cache.CACHE_FILE).write_text(json.dumps({cache.table_key(None): whole}))

    def never(pattern=None):
        raise AssertionError("the cached table should have been filtered, not recomputed")

    monkeypatch.setattr(cache, "model_table_rows", never)
    assert [r["name"] for r in cache.cached_model_table_rows("vgg")] == ["vgg11", "vgg11_bn"]
    assert [r["name"] for r in cache.cached_model_table_rows("*18")] == ["resnet18"]


def test_a_failing_user_model_names_its_layer_and_the_layers_that_ran() -> None:
    from torch import nn

    from cnnlab.errors import CnnlabError
    from cnnlab.inspect.summary import summarize

    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(100, 10))
    with pytest.raises(CnnlabError) as caught:
        summarize(net, (1, 16, 16))
    message = str(caught.value)
    assert "in 3 (Linear), whose input is 392: mat1 and mat2 shapes cannot be multiplied" in message
    assert message.endswith("layers that ran: 0 (Conv2d) -> 8x14x14, 1 (MaxPool2d) -> 8x7x7,"
                            " 2 (Flatten) -> 392")  # fmt: skip
    assert "\n" not in message


def test_summary_help_lists_the_builder_flags(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["summary", "--help"])
    text = capsys.readouterr().out
    assert "--cdims 32,64 --hdims 1024,128" in text and "--zero-init-residual false" in text
