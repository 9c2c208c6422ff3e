"""The explore API (``cnnlab explore``) in-process: a network's layers are the summary's rows
with their blocks and joins, one layer's maps come for a sample or an uploaded image, one
unit's field is the box where the unit's gradient with respect to the input is nonzero,
a classifier run gets its classes and Grad-CAM, and bad input is a 4xx one-line JSON after
which the server goes on."""

from __future__ import annotations

import copy
import io
import textwrap
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from torch import nn

from cnnlab.inspect.specs import build_model, summarize_spec
from cnnlab.serve import create_app

# A DenseNet's concatenation and a ResNet's + x in a few lines, and a file that fails.
MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 4, 3, padding=1)
            self.grow = nn.Conv2d(4, 2, 3, padding=1)
            self.more = nn.Conv2d(6, 2, 3, padding=1)
            self.head = nn.Conv2d(8, 3, 1)

        def forward(self, x):
            x = self.stem(x)
            x = torch.cat([x, self.grow(x)], 1)
            x = torch.cat([x, self.more(x)], 1)
            return self.head(x)

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x).view(-1, 7)
    """
)


def client(*runs: Path, **options) -> TestClient:
    return TestClient(create_app(list(runs), device="cpu", allow_hosts=["testserver"], **options))


@pytest.fixture(scope="module")
def explore(tmp_path_factory) -> TestClient:
    """A server exploring ResNet-18 at 32x32 (the command line's model); registered models
    are explored by name too."""
    with client(explore="resnet18", explore_input=(3, 32, 32)) as opened:
        yield opened


def get(api: TestClient, name: str, **params) -> dict:
    response = api.get(f"/api/explore{name}", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def refused(api: TestClient, status: int, name: str, **params) -> str:
    response = api.get(f"/api/explore{name}", params=params)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert "\n" not in detail and "Traceback" not in detail
    return detail


def test_layers_are_the_summary_rows_with_blocks_and_the_resnet_joins(explore):
    document = get(explore, "/layers", model="resnet18")
    _, summary, _ = summarize_spec("resnet18", {}, (3, 32, 32))
    expected = summary.to_dict("resnet18")
    assert document["input"] == [3, 32, 32]
    for row, want in zip(document["layers"], expected["layers"], strict=True):
        assert {k: row[k] for k in want} == want  # the formulas, sizes and fields as printed
    assert document["total_params"] == expected["total_params"]
    conv = document["layers"][4]
    assert (conv["name"], conv["blocks"]) == ("layer1.0.conv1", ["layer1", "layer1.0"])
    assert document["blocks"]["layer1.0"] == {"type": "BasicBlock", "depth": 2, "rows": [4, 9]}
    assert conv["params_so_far"] == sum(r["params"] for r in expected["layers"][:5])
    # ResNet-18's eight + x: the first adds bn2's output to the maxpool's (the block input).
    joins = document["joins"]
    assert [j["kind"] for j in joins] == ["add"] * 8
    first = joins[0]
    names = [document["layers"][i]["name"] for i in first["from"]]
    assert (first["block"], names) == ("layer1.0", ["layer1.0.bn2", "maxpool"])
    assert document["layers"][first["after"]]["name"] == "layer1.0.bn2"
    downsampled = joins[2]  # layer2.0: its shortcut is the downsample's output
    assert document["layers"][downsampled["from"][1]]["name"] == "layer2.0.downsample.1"


def gradient_box(model: nn.Module, size, layer: str, y: int, x: int) -> list[int]:
    """[x0, y0, x1, y1] of the input pixels where the gradient of unit (y, x) of ``layer``'s
    output is nonzero, on a copy with positive weights and max pools made average pools
    (the same windows; every pixel of a window then gets gradient), asserting that every
    pixel of that box does."""
    model = swap_max_pools(copy.deepcopy(model)).double().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.abs() + 0.1)
    captured = []

    def capture(_module, _inputs, output):
        captured.append(output)
        raise StopIteration  # the rest of the forward pass is not needed

    handle = model.get_submodule(layer).register_forward_hook(capture)
    pixels = torch.ones(1, *size, dtype=torch.float64, requires_grad=True)
    with pytest.raises(StopIteration):
        model(pixels)
    handle.remove()
    (grad,) = torch.autograd.grad(captured[0][0, :, y, x].sum(), pixels)
    seen = grad[0].abs().sum(dim=0) > 0
    rows, cols = seen.nonzero(as_tuple=True)
    box = [int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())]
    assert seen[box[1] : box[3] + 1, box[0] : box[2] + 1].all()  # no hole inside the box
    return box


def swap_max_pools(model: nn.Module) -> nn.Module:
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.MaxPool2d):
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            average = nn.AvgPool2d(module.kernel_size, module.stride, module.padding)
            setattr(parent, name.rpartition(".")[2], average)
    return model


def test_a_units_field_is_where_its_gradient_is_nonzero(explore):
    model, size = build_model("convnet", {}, None)
    for layer, y, x in [(5, 0, 0), (8, 3, 4)]:  # a unit in the padding corner, one inside
        field = get(explore, "/field", model="convnet", layer=layer, y=y, x=x)
        name = field["name"]
        assert field["inside"] == gradient_box(model, size, name, y, x), name
    corner = get(explore, "/field", model="convnet", layer=5, y=0, x=0)
    assert corner["box"][:2] == [-3, -3] and corner["inside"][:2] == [0, 0]
    assert corner["centre"] == [0.5, 0.5] and corner["size"] == [8, 8]
    steps = [(step["name"], step["step"]) for step in corner["chain"]]
    assert steps == [
        ("features.conv2d_00", "1 + (3 - 1)*1 = 3"),
        ("features.maxpool2d_03", "3 + (2 - 1)*1 = 4"),
        ("features.conv2d_05", "4 + (3 - 1)*2 = 8"),
    ]


def test_maps_of_one_layer_for_a_sample_and_an_uploaded_image(explore):
    maps = get(explore, "/maps", model="resnet18", layer=4, image="digit", count=5)
    assert maps["shape"] == [64, 8, 8] and len(maps["channels"]) == 5
    means = [c["mean"] for c in maps["channels"]]
    assert means == sorted(means, reverse=True)
    assert maps["channels"][0]["png"].startswith("data:image/png;base64,")
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buffer, "PNG")
    response = explore.post(
        "/api/explore/images", files={"file": ("red.png", buffer.getvalue(), "image/png")}
    )
    assert response.status_code == 200, response.text
    token = response.json()["image"]
    assert response.json()["size"] == [3, 30, 40]
    view = get(explore, "/view", model="resnet18", image=token)
    assert view["size"] == [3, 32, 32]
    assert get(explore, "/maps", model="resnet18", layer=0, image=token)["shape"] == [64, 16, 16]


def test_bad_input_is_a_4xx_line_and_the_server_goes_on(explore, tmp_path):
    assert "unknown model" in refused(explore, 404, "/layers", model="resnet1800")
    assert "explore` names it" in refused(explore, 404, "/layers", model=f"{tmp_path}/x.py:Net")
    assert "layers 0 to 59" in refused(
        explore, 400, "/maps", model="resnet18", layer=99, image="digit"
    )
    assert "not maps" in refused(explore, 400, "/maps", model="resnet18", layer=59, image="digit")
    assert "outside" in refused(explore, 400, "/field", model="resnet18", layer=4, y=8, x=0)
    assert "upload it again" in refused(
        explore, 404, "/maps", model="resnet18", layer=0, image="u0"
    )
    assert "no classifier run" in refused(explore, 400, "/classes", model="resnet18", image="digit")
    assert "input" in refused(explore, 422, "/layers", model="resnet18", input="3,99999,2")
    response = explore.post(
        "/api/explore/images", files={"file": ("x.png", b"not an image", "image/png")}
    )
    assert response.status_code == 400 and "x.png" in response.json()["detail"]
    assert get(explore, "/layers", model="convnet")["model"] == "convnet"  # still serving


def test_a_model_file_with_concatenations_and_one_that_fails_to_build(tmp_path):
    source = tmp_path / "models.py"
    source.write_text(MODELS)
    with client(explore=f"{source}:Dense", explore_input=(1, 12, 12)) as api:
        document = get(api, "/layers", model=f"{source}:Dense")
        joins = document["joins"]
        assert [j["kind"] for j in joins] == ["concat", "concat"]
        layers = document["layers"]
        names = [[None if i is None else layers[i]["name"] for i in j["from"]] for j in joins]
        # The second joins the first's output (made by no layer: None) and ``more``'s.
        assert names == [["stem", "grow"], [None, "more"]]
        assert joins[1]["inputs"] == [[6, 12, 12], [2, 12, 12]]
        assert joins[1]["output"] == [8, 12, 12]
        maps = get(api, "/maps", model=f"{source}:Dense", layer=3, image="digit")
        assert maps["shape"] == [3, 12, 12]
    with client(explore=f"{source}:Broken", explore_input=(3, 8, 8)) as api:
        detail = refused(api, 400, "/layers", model=f"{source}:Broken")
        assert "Broken failed on input 3,8,8" in detail
        assert api.get("/healthz").status_code == 200
        assert get(api, "/layers", model="convnet")["input"] == [1, 28, 28]
        assert api.get("/", follow_redirects=False).headers["location"] == "/explore"
    missing = f"{tmp_path}/missing.py:Net"
    with client(explore=missing) as api:
        assert "missing.py: no such file" in refused(api, 400, "/layers", model=missing)


def test_a_classifier_runs_classes_and_gradcam(serve_runs):
    run = serve_runs["classify"]
    with client(run) as api:
        assert run.name in get(api, "")["runs"]
        document = get(api, "/layers", model=run.name)
        assert document["classes"] == [str(d) for d in range(10)]
        top = get(api, "/classes", model=run.name, image="digit", count=3)["top"]
        assert len(top) == 3 and top[0]["prob"] >= top[-1]["prob"]
        conv = next(r["index"] for r in document["layers"] if r["type"] == "Conv2d")
        cam = get(api, "/gradcam", model=run.name, layer=conv, image="digit", **{"class": "3"})
        assert cam["class"] == "3" and cam["map_png"].startswith("data:image/png")
        assert "unknown class" in refused(
            api, 400, "/gradcam", model=run.name, layer=conv, image="digit", **{"class": "x"}
        )
        page = api.get("/explore")
        assert page.status_code == 200 and "explore.js" in page.text
        assert page.headers["content-security-policy"].startswith("default-src 'self'")
