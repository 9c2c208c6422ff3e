from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab.errors import CnnlabError
from cnnlab.evaluation_plots import plot_confusion, plot_errors
from cnnlab.plots import line_label, plot_curves, spike_indices
from cnnlab.tasks.classify import ClassifyTask

CLASSIFY_CURVES = ClassifyTask.metrics.curves

HEADER = "epoch,lr,train_loss,train_top1,val_loss,val_top1,val_top5,seconds\n"


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def assert_only_file(path: Path) -> None:
    # Written atomically: no temporary file is left beside the PNG.
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def write_metrics(path: Path, epochs: int) -> Path:
    rows = [
        f"{e},0.001,{2.0 / e:.3f},{0.2 * e:.3f},{2.2 / e:.3f},{0.18 * e:.3f},0.9,1.5\n"
        for e in range(1, epochs + 1)
    ]
    path.write_text(HEADER + "".join(rows))
    return path


@pytest.mark.parametrize("epochs", [0, 1, 4])
def test_curves_png_two_panels(tmp_path: Path, epochs: int) -> None:
    csv = write_metrics(tmp_path / "metrics.csv", epochs)
    out = tmp_path / "plots" / "curves.png"
    out.parent.mkdir()
    plot_curves(csv, out, CLASSIFY_CURVES)
    pixels = read_png(out)
    height, width, _ = pixels.shape
    assert 800 <= width <= 1200 and 300 <= height <= 500  # two panels side by side
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # axes, text and lines drawn
    assert_only_file(out)


def test_curves_missing_csv_names_file(tmp_path: Path) -> None:
    with pytest.raises(CnnlabError, match=r"nothere\.csv"):
        plot_curves(tmp_path / "nothere.csv", tmp_path / "curves.png", CLASSIFY_CURVES)
    assert not (tmp_path / "curves.png").exists()


@pytest.mark.parametrize("k", [1, 3, 120])
def test_confusion_png_grows_with_classes(tmp_path: Path, k: int) -> None:
    matrix = torch.randint(0, 20, (k, k))
    matrix[0] = 0  # a class with no test images must not divide by zero
    out = tmp_path / "confusion.png"
    plot_confusion(matrix, [f"class_{i}" for i in range(k)], out)
    height, width, _ = read_png(out).shape
    assert height >= 400 and width >= height
    if k == 120:
        assert height >= 2000  # ~0.2 inch per class keeps 120 names readable
    assert_only_file(out)


def test_confusion_shape_must_match_classes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3 classes"):
        plot_confusion(torch.zeros(2, 2), ["a", "b", "c"], tmp_path / "c.png")


def test_confusion_is_row_normalised_and_cells_give_counts(tmp_path: Path) -> None:
    import matplotlib.axes

    texts: list[str] = []
    original = matplotlib.axes.Axes.text

    def text(ax, x, y, s, *args, **kwargs):
        texts.append(s)
        return original(ax, x, y, s, *args, **kwargs)

    def draw(matrix: list[list[int]]) -> list[str]:
        texts.clear()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(matplotlib.axes.Axes, "text", text)
            plot_confusion(torch.tensor(matrix), ["a", "b"], tmp_path / "confusion.png")
        return sorted(texts)

    # The colour is the row's fraction; each non-empty cell reads "count" over "fraction".
    assert draw([[50, 0], [0, 5]]) == ["5\n1.00", "50\n1.00"]
    assert draw([[45, 5], [0, 1200]]) == ["1,200\n1.00", "45\n0.90", "5\n0.10"]


def normalise(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return (images - mean) / std


def test_errors_grid_rgb(tmp_path: Path) -> None:
    images = normalise(torch.rand(5, 3, 16, 16), 0.5, 0.25)
    out = tmp_path / "errors.png"
    plot_errors(list(images), list("abcde"), list("edcba"), [0.9] * 5, [0.1, 3, 2, 1, 0.5],
                out, mean=(0.5,) * 3, std=(0.25,) * 3)  # fmt: skip
    pixels = read_png(out).astype(int)
    assert pixels.shape[0] >= 400 and pixels.shape[1] >= 600  # 2 rows x 3 columns
    colourful = np.abs(pixels[..., 0] - pixels[..., 1]) + np.abs(pixels[..., 1] - pixels[..., 2])
    assert (colourful > 30).sum() > 1000
    assert_only_file(out)


def test_errors_grayscale_shown_in_grey_and_denormalised(tmp_path: Path) -> None:
    # A uniform 0.5 grey image normalised with mean 0.5 / std 0.5 is all zeros.
    images = [torch.zeros(1, 16, 16), torch.zeros(1, 16, 16)]
    out = tmp_path / "errors.png"
    plot_errors(images, ["3", "8"], ["8", "3"], [0.6, 0.7], [1.0, 2.0], out, (0.5,), (0.5,))
    pixels = read_png(out).astype(int)
    mid_grey = (np.abs(pixels - 128) <= 2).all(axis=-1)
    assert mid_grey.sum() > 5000  # the de-normalised image, not black (0) or clipped
    # No colour map on the images: the only colour is the titles' red (both are wrong).
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 110) & (pixels[..., 2] < 110)
    green = (pixels[..., 1] > 100) & (pixels[..., 0] < 90) & (pixels[..., 2] < 90)
    colourful = np.abs(pixels[..., 0] - pixels[..., 2]) > 30
    assert red.sum() > 50 and green.sum() == 0
    assert colourful.sum() < 0.03 * colourful.size


def test_errors_titles_say_right_in_green_and_wrong_in_red(tmp_path: Path) -> None:
    images = [torch.zeros(1, 16, 16)] * 2
    out = tmp_path / "errors.png"
    plot_errors(images, ["3", "8"], ["3", "8"], [0.9, 0.8], [0.1, 0.2], out, (0.5,), (0.5,))
    pixels = read_png(out).astype(int)
    green = (pixels[..., 1] > 100) & (pixels[..., 0] < 90) & (pixels[..., 2] < 90)
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 110) & (pixels[..., 2] < 110)
    assert green.sum() > 50 and red.sum() == 0


def test_errors_capped_to_sixteen_worst(tmp_path: Path) -> None:
    def draw(n: int) -> tuple[int, ...]:
        out = tmp_path / f"errors{n}.png"
        images = list(torch.zeros(n, 3, 8, 8))
        labels = [str(i) for i in range(n)]
        plot_errors(images, labels, labels, [0.5] * n, list(range(n)), out, (0,) * 3, (1,) * 3)
        return read_png(out).shape

    assert draw(40) == draw(16) != draw(4)


def test_errors_empty_is_a_valid_png(tmp_path: Path) -> None:
    out = tmp_path / "errors.png"
    plot_errors([], [], [], [], [], out, (0.5,), (0.5,))
    assert read_png(out).shape[0] >= 200


def test_errors_length_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="same length"):
        plot_errors([torch.zeros(1, 4, 4)], ["a"], [], [1], [1.0], tmp_path / "e.png", (0,), (1,))


def test_curves_take_the_tasks_panels_and_line_names(tmp_path: Path) -> None:
    csv = write_metrics(tmp_path / "metrics.csv", 3)
    panels = {"loss": ("train_loss", "val_loss"), "top-1": ("val_top1",), "top-5": ("val_top5",)}
    plot_curves(csv, tmp_path / "three.png", panels)
    plot_curves(csv, tmp_path / "two.png", CLASSIFY_CURVES)
    three, two = read_png(tmp_path / "three.png"), read_png(tmp_path / "two.png")
    assert three.shape[0] == two.shape[0] and three.shape[1] == pytest.approx(1.5 * two.shape[1])
    assert line_label("val_loss", ("train_loss", "val_loss")) == "val"
    assert line_label("val_top1", ("val_top1", "val_top5")) == "val_top1"
    assert line_label("val_map", {"val_map50": "mAP@0.5", "val_map": "mAP"}) == "mAP"


def test_a_spike_is_found_and_the_best_epoch_drawn(tmp_path: Path) -> None:
    losses = [2.0, 1.2, 0.8, 17.7, 0.5, 0.4, 0.35]
    assert spike_indices(losses) == {3}
    assert spike_indices([2.0, 1.2, 0.8, 0.6, 0.5]) == set()  # a falling start is no spike
    assert spike_indices([0.5, 0.4, 3.0]) == {2}  # the last epoch can be one
    # An overfitting model's val loss climbs and stays up (issue 25): every epoch far above
    # where it started is clipped, so the train loss is not flattened under it.
    assert spike_indices([1.6, 3.0, 10.0, 24.6, 18.0]) == {2, 3, 4}
    metrics = tmp_path / "metrics.csv"
    metrics.write_text(
        "epoch,train_loss,val_loss\n" + "".join(f"{i + 1},{v},{v}\n" for i, v in enumerate(losses))
    )
    plot_curves(metrics, tmp_path / "plain.png", {"loss": ("train_loss", "val_loss")})
    plot_curves(metrics, tmp_path / "best.png", {"loss": ("train_loss", "val_loss")}, 5)
    assert not np.array_equal(read_png(tmp_path / "plain.png"), read_png(tmp_path / "best.png"))


def test_a_spike_inside_the_other_lines_range_is_not_clipped(tmp_path: Path) -> None:
    """The demo's first val loss (0.48, then 0.1 and less) is a spike of its own line but
    below the first train loss (1.9): the axis must reach 1.9 and no marker stands for 0.48."""
    import matplotlib.axes

    train = [1.87, 0.63, 0.40, 0.29, 0.25]
    val = [0.48, 0.11, 0.07, 0.05, 0.03]
    assert spike_indices(val) == {0}
    metrics = tmp_path / "metrics.csv"
    metrics.write_text(
        "epoch,train_loss,val_loss\n"
        + "".join(f"{i + 1},{t},{v}\n" for i, (t, v) in enumerate(zip(train, val, strict=True)))
    )
    markers, annotations = [], []
    original_plot, original_annotate = matplotlib.axes.Axes.plot, matplotlib.axes.Axes.annotate

    def plot(ax, *args, **kwargs):
        markers.append(kwargs.get("marker"))
        return original_plot(ax, *args, **kwargs)

    def annotate(ax, text, *args, **kwargs):
        annotations.append(text)
        return original_annotate(ax, text, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(matplotlib.axes.Axes, "plot", plot)
        patch.setattr(matplotlib.axes.Axes, "annotate", annotate)
        plot_curves(metrics, tmp_path / "curves.png", {"loss": ("train_loss", "val_loss")})
    assert markers == ["o", "o"]  # the two lines, no clipped-spike marker
    assert annotations == []
