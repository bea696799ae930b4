"""Latency profiling, accuracy estimation, profile files, plots and the commands (CPU, offline)."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import pytest
import torch
from conftest import make_tiny_vit
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pomt
from pomt import SearchConfig, Target, Timing, cli
from pomt.data import balanced_indices
from pomt.deploy.runtimes import cuda_graph_or_eager
from pomt.method.pruning import apply_pruning, pruning_config
from pomt.offline.profiles import AccuracyPoint, AccuracyProfile, LatencyProfile
from pomt.offline.profiling import estimate_accuracy, profile_latency
from pomt.timing import TimingStats, time_paired

FAST = dict(timing=Timing(warmup=0, repeats=2, relative=False), progress=False)


class Wrapper(nn.Module):
    """A LightningModule-like wrapper: the ViT is a submodule, forward adds a head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = make_tiny_vit(num_classes=0)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def tokens_leaving(block: nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    seen: list[int] = []
    handle = block.register_forward_hook(lambda _m, _a, out: seen.append(out.shape[1]))
    return seen, handle


def labelled_data(n: int = 60, classes: int = 10, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=gen), torch.arange(n) % classes)


# --------------------------------------------------------------------------- latency


def test_profile_latency_of_a_tiny_vit_on_cpu():
    model = make_tiny_vit()
    model.train()
    lat = profile_latency(model, target=Target(batch_size=2), **FAST)
    n_total = 17  # 4 x 4 patches + CLS
    assert lat.n_total == n_total and lat.prefix == 1
    assert lat.grid[-1] == n_total and lat.grid[0] == 2  # N and p + 1 always measured
    assert lat.threads == torch.get_num_threads() and lat.device_type == "cpu"
    assert (lat.batch_size, lat.dtype, lat.img_size, lat.layer) == (2, "float32", (32, 32), 3)
    for p in lat.points:
        assert 0 < p.p10_ms <= p.p25_ms <= p.median_ms <= p.p75_ms <= p.p90_ms and p.samples == 2
    assert model.training and pruning_config(model) is None  # state restored


def test_relative_profile_pairs_every_point_with_the_unpruned_model():
    model = make_tiny_vit()
    calls: list[int] = []
    hook = model.blocks[-1].register_forward_hook(lambda m, i, o: calls.append(o.shape[1]))
    lat = profile_latency(
        model,
        target=Target(batch_size=2),
        layer=1,
        progress=False,
        search=SearchConfig(grid=[17, 9, 3]),
        timing=Timing(relative=True, warmup=0, min_run_time=0.0, repeats=4),
    )
    hook.remove()
    assert lat.grid == [3, 9, 17] and lat.sampling.endswith("relative to N")
    assert calls[:8] == [17] * 8  # n = N first: both calls of each pair are the unpruned model
    assert calls[8:16] == [9, 17] * 4  # then n = 9 alternating with the reference, call by call
    assert lat.points[-1].samples == 3 * 4  # N pools the reference samples of every pair
    assert all(p.median_ms > 0 for p in lat.points) and pruning_config(model) is None


def test_time_paired_ratio_cancels_a_drifting_machine():
    speed = iter([1.0, 1.0, 3.0, 3.0, 0.5, 0.5, 2.0, 2.0, 1.0, 1.0, 4.0, 4.0])  # drift shared within a pair
    work = {"a": 2, "b": 1}

    def run(name):
        def call():
            factor = next(speed)
            time.sleep(0.004 * work[name] * factor)

        return call

    ratios, ref = time_paired(run("a"), run("b"), warmup=0, min_run_time=0.0, min_pairs=6)
    assert len(ratios) == len(ref) == 6
    assert statistics.median(ratios) == pytest.approx(2.0, rel=0.35)
    assert max(ref) / min(ref) > 3  # the absolute times drifted eightfold


def test_profile_latency_times_the_deployed_model_inside_a_wrapper():
    model = Wrapper()
    apply_pruning(model.backbone, "pomt", r=5, layer=1)
    before = pruning_config(model.backbone)
    seen, handle = tokens_leaving(model.backbone.blocks[2])
    lat = profile_latency(
        model, target=Target(batch_size=1), layer=2, search=SearchConfig(grid=[17, 9, 3]), **FAST
    )
    handle.remove()
    assert lat.grid == [3, 9, 17]
    assert set(seen) == {3, 9, 17}  # n tokens leave the pruning block, N means unpruned
    assert pruning_config(model.backbone) == before  # the earlier pruning is back


def test_cuda_graphs_degrade_gracefully_on_cpu():
    with pytest.warns(UserWarning, match="CUDA graphs need a CUDA device"):
        lat = profile_latency(
            make_tiny_vit(),
            target=Target(batch_size=1, runtime="cuda_graphs"),
            search=SearchConfig(grid=[2, 17]),
            **FAST,
        )
    assert lat.cuda_graphs is False and lat.grid == [2, 17]


def test_a_failed_graph_capture_times_the_eager_call_and_says_why():
    def fn():
        return 42

    with pytest.warns(UserWarning, match="tome r=8: CUDA graph capture failed"):
        call, mode = cuda_graph_or_eager(fn, "cpu", "tome r=8: ")  # a CPU device cannot be captured
    assert call is fn and call() == 42
    assert mode.startswith("eager (graph capture failed: ")


def test_profile_latency_rejects_bad_arguments():
    model = make_tiny_vit()
    with pytest.raises(ValueError, match="layer must be an int in 0..3"):
        profile_latency(model, layer=4, **FAST)
    with pytest.raises(ValueError, match=r"outside the valid range 2..17"):
        profile_latency(model, search=SearchConfig(grid=[1, 17]), **FAST)
    with pytest.raises(ValueError, match="batch_size"):
        profile_latency(model, target=Target(batch_size=0), **FAST)
    with pytest.raises(ValueError, match="dtype"):
        profile_latency(model, target=Target(dtype="int8"), **FAST)


def test_injected_timer_drives_the_default_search():
    model = make_tiny_vit(img_size=64)  # N = 65: the default search does not time every n
    calls: list[int] = []

    def fake(n: int) -> TimingStats:
        calls.append(n)
        return TimingStats.from_samples([10.0 + 5 * (n > 40), 10.0 + 5 * (n > 40)])

    lat = profile_latency(model, timing=fake, progress=False)
    assert lat.grid == sorted(calls) and len(calls) < 64 and lat.sampling == "fast"
    assert {40, 41} <= set(lat.grid)  # the one step was located exactly
    assert pomt.select_r(lat, {n: n / 65 for n in range(2, 66)}, alpha=0.5).n_star in (40, 65)


def test_guided_search_through_profile_latency_and_a_foreign_accuracy_profile():
    model = make_tiny_vit(img_size=64)  # N = 65
    steps = (20, 40)
    fake = lambda n: TimingStats.from_samples([10.0 + 4 * sum(n > s for s in steps)] * 3)  # noqa: E731
    acc = {n: 0.8 * (1 - math.exp(-n / 12)) for n in (2, 10, 20, 30, 40, 50, 65)}
    lat = profile_latency(model, timing=fake, accuracy=acc, progress=False, search=SearchConfig(alpha=0.5))
    assert lat.sampling.startswith("fast-guided")
    full = {n: fake(n) for n in range(2, 66)}
    assert pomt.select_r(lat, acc).n_star == pomt.select_r(full, acc).n_star
    foreign = estimate_accuracy(
        make_tiny_vit(),
        labelled_data(),
        search=SearchConfig(accuracy_samples=10, accuracy_grid=[2, 17]),
        progress=False,
    )
    with pytest.raises(ValueError, match="accuracy profile is for N=17"):
        profile_latency(model, timing=fake, accuracy=foreign, progress=False)


# --------------------------------------------------------------------------- accuracy


def test_estimate_accuracy_is_reproducible_and_leaves_the_global_rng_alone():
    model = make_tiny_vit()
    data = labelled_data()
    state = torch.get_rng_state()
    acc = estimate_accuracy(
        model,
        data,
        search=SearchConfig(accuracy_samples=30, accuracy_grid=[2, 5, 17], seed=3, accuracy_batch_size=8),
        progress=False,
    )
    assert torch.equal(torch.get_rng_state(), state)
    again = estimate_accuracy(
        model,
        data,
        search=SearchConfig(accuracy_samples=30, accuracy_grid=[17, 5, 2], seed=3, accuracy_batch_size=8),
        progress=False,
    )
    assert again.points == acc.points
    assert acc.grid == [2, 5, 17] and acc.num_samples == 30 and acc.class_balanced
    assert acc.num_classes == 10 and acc.n_total == 17
    loader = DataLoader(data, batch_size=8, shuffle=True)
    assert (
        estimate_accuracy(
            model,
            loader,
            search=SearchConfig(accuracy_samples=30, accuracy_grid=[2, 5, 17], seed=3),
            progress=False,
        ).points
        == acc.points
    )


def test_accuracy_is_micro_top1_on_the_seeded_sample_with_tokens_kept():
    model = Wrapper()
    labels = torch.tensor([0] * 40 + [1, 2, 3, 4, 5])  # imbalanced even after balancing
    data = TensorDataset(torch.randn(45, 3, 32, 32, generator=torch.Generator().manual_seed(1)), labels)
    seen, handle = tokens_leaving(model.backbone.blocks[0])
    acc = estimate_accuracy(
        model,
        data,
        search=SearchConfig(accuracy_samples=20, accuracy_grid=[4, 17], seed=0, accuracy_batch_size=7),
        progress=False,
    )
    handle.remove()
    assert set(seen) == {4, 17}  # the random subset is active while A(n) is measured
    idx = balanced_indices(labels.tolist(), 20, seed=0)
    with torch.no_grad():
        pred = model(data.tensors[0][idx]).argmax(-1)
    micro = (pred == labels[idx]).float().mean().item()
    assert acc.accuracy[17] == pytest.approx(micro)  # N tokens: the plain model's top-1
    assert acc.points[0].samples == 20


def test_estimate_accuracy_on_a_hugging_face_dataset_with_a_transform():
    datasets = pytest.importorskip("datasets")
    images = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ds = datasets.Dataset.from_dict({"image": images.tolist(), "label": [i % 3 for i in range(12)]})
    ds = ds.with_transform(lambda b: {"pixel_values": torch.tensor(b["image"]), "label": b["label"]})
    model = make_tiny_vit(num_classes=3)
    acc = estimate_accuracy(
        model,
        ds,
        search=SearchConfig(accuracy_samples=9, accuracy_grid=[3, 17], accuracy_batch_size=4),
        progress=False,
    )
    assert acc.class_balanced and acc.num_samples == 9 and acc.grid == [3, 17]


def test_estimate_accuracy_errors():
    model = make_tiny_vit()
    bad = TensorDataset(torch.randn(8, 3, 32, 32), torch.full((8,), 12))
    with pytest.raises(ValueError, match=r"labels must be in 0..9"):
        estimate_accuracy(
            model, bad, search=SearchConfig(accuracy_samples=8, accuracy_grid=[17]), progress=False
        )
    with pytest.raises(ValueError, match="Dataset or DataLoader"):
        estimate_accuracy(model, 42, progress=False)
    assert pruning_config(model) is None


# --------------------------------------------------------------------------- profiles as files


def test_latency_profile_sampling_reads_its_old_key_search(tmp_path):
    lat = profile_latency(
        make_tiny_vit(), target=Target(batch_size=2), search=SearchConfig(grid=[2, 17]), **FAST
    )
    data = lat.to_dict()
    assert data["sampling"] == "grid" and "search" not in data
    data["search"] = data.pop("sampling")  # as a profile saved before the rename
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = LatencyProfile.load(tmp_path / "old.json")
    assert old == lat and old.sampling == "grid"
    assert not hasattr(old, "search")  # "search" is find_r's word only: no alias on the record


def test_profiles_round_trip_through_json(tmp_path):
    model = make_tiny_vit()
    lat = profile_latency(model, target=Target(batch_size=2), search=SearchConfig(grid=[2, 9, 17]), **FAST)
    acc = estimate_accuracy(
        model,
        labelled_data(),
        search=SearchConfig(accuracy_samples=20, accuracy_grid=[2, 17]),
        progress=False,
    )
    lat_path, acc_path = lat.save(tmp_path / "a" / "lat.json"), acc.save(tmp_path / "acc.json")
    data = json.loads(lat_path.read_text())
    assert data["schema"] == "pomt.latency_profile" and data["schema_version"] == 2
    for key in (
        "model",
        "device",
        "torch_version",
        "timm_version",
        "batch_size",
        "dtype",
        "img_size",
        "layer",
    ):
        assert key in data
    assert LatencyProfile.load(lat_path) == lat
    assert AccuracyProfile.load(acc_path) == acc
    same = LatencyProfile.load(
        lat_path, expect=dict(batch_size=2, dtype=torch.float32, device="cpu", layer=3)
    )
    assert same == lat
    # latency and accuracy from different files (machines) combine
    sel = pomt.select_r(LatencyProfile.load(lat_path), AccuracyProfile.load(acc_path))
    assert sel.n_star == sel.n_total - sel.r and sel.n_star in (2, 9, 17)
    # files of the unreleased schema version 1 are refused with a clear error, never misread
    old = json.loads(lat_path.read_text())
    old["schema_version"] = 1
    (tmp_path / "v1.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="schema_version 1 predates the first release"):
        LatencyProfile.load(tmp_path / "v1.json")


@pytest.mark.parametrize(
    "field, value",
    [
        ("batch_size", 8),
        ("dtype", torch.float16),
        ("model", "deit_small_patch16_224"),
        ("img_size", (64, 64)),
    ],
)
def test_a_mismatched_profile_is_rejected_naming_the_field(tmp_path, field, value):
    lat = profile_latency(
        make_tiny_vit(), target=Target(batch_size=2), search=SearchConfig(grid=[2, 17]), **FAST
    )
    path = lat.save(tmp_path / "lat.json")
    with pytest.raises(ValueError, match=f"measured with {field}="):
        LatencyProfile.load(path, expect={field: value})


def test_profiles_for_different_models_or_token_counts_do_not_combine():
    lat = profile_latency(
        make_tiny_vit(), target=Target(batch_size=1), search=SearchConfig(grid=[2, 17]), **FAST
    )
    other = AccuracyProfile(
        model=lat.model,
        device="x",
        num_samples=1,
        num_classes=10,
        seed=0,
        class_balanced=True,
        dataset="d",
        img_size=(64, 64),
        n_total=65,
        prefix=1,
        torch_version="",
        timm_version="",
        points=[AccuracyPoint(2, 0.1, 1), AccuracyPoint(17, 0.5, 1)],
    )
    with pytest.raises(ValueError, match="disagree on N"):
        pomt.select_r(lat, other)
    renamed = AccuracyProfile(**{**other.__dict__, "model": "deit_tiny_patch16_224", "n_total": 17})
    with pytest.raises(ValueError, match="different models"):
        pomt.select_r(lat, renamed)


def test_corrupt_truncated_and_foreign_files_give_clear_errors(tmp_path):
    lat = profile_latency(
        make_tiny_vit(), target=Target(batch_size=1), search=SearchConfig(grid=[2, 17]), **FAST
    )
    text = lat.save(tmp_path / "lat.json").read_text()
    cases = {
        "truncated.json": (text[: len(text) // 2], "not valid JSON"),
        "garbage.json": ("\x00\x01 not json", "not valid JSON|not a text"),
        "list.json": ("[1, 2]", "expected a JSON object"),
        "other.json": (
            json.dumps({"schema": "pomt.accuracy_profile", "schema_version": 1}),
            "not a latency profile",
        ),
        "newer.json": (text.replace('"schema_version": 2', '"schema_version": 99'), "newer pomt"),
        "nofield.json": (text.replace('"batch_size"', '"batch"'), "missing field.*batch_size"),
        "badpoint.json": (
            text.replace('"median_ms": ', '"median_ms": "fast", "x": '),
            "point 0 has a bad value",
        ),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match=message):
            LatencyProfile.load(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        LatencyProfile.load(tmp_path / "missing.json")


# --------------------------------------------------------------------------- end to end, plots


def test_selected_r_leaves_exactly_n_star_tokens_after_the_pruning_block():
    model = make_tiny_vit()
    lat = profile_latency(model, target=Target(batch_size=2), layer=2, **FAST)
    acc = estimate_accuracy(
        model, labelled_data(), search=SearchConfig(accuracy_samples=20, accuracy_points=6), progress=False
    )
    for alpha in (0.0, 0.5, 1.0):
        sel = pomt.select_r(lat, acc, alpha=alpha)
        assert sel.n_star == sel.n_total - sel.r and sel.layer == 2
        apply_pruning(model, "pomt", r=sel.r, layer=sel.layer)
        seen, handle = tokens_leaving(model.blocks[sel.layer])
        with torch.no_grad():
            model(torch.randn(2, 3, 32, 32))
        handle.remove()
        assert seen == [sel.n_star]  # not n* + 2 as in the authors' code


def test_plot_profiles_makes_a_png(tmp_path):
    lat = {n: TimingStats.from_samples([10 + (n > 9), 10.2 + (n > 9)]) for n in range(2, 18)}
    acc = {n: 0.8 * (1 - math.exp(-n / 5)) for n in (2, 6, 10, 17)}
    sel = pomt.select_r(lat, acc, latency_budget_ms=10.5)
    fig = pomt.plots.plot_profiles(lat, acc, sel)
    assert len(fig.axes) == 3 and str(sel.r) in fig._suptitle.get_text()
    path = pomt.plots.save_figure(fig, tmp_path / "plots" / "profile.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    from matplotlib.figure import Figure

    outer = Figure(figsize=(12, 6))
    left, right = outer.subfigures(1, 2)
    assert pomt.plots.plot_profiles(lat, acc, sel, fig=right) is right and len(outer.axes) == 3


def test_selection_round_trips_through_a_dict():
    sel = pomt.select_r({2: 5.0, 4: 8.0, 6: 10.0}, {2: 0.2, 6: 0.7})
    again = pomt.Selection.from_dict(json.loads(json.dumps(sel.to_dict())))
    assert again == sel
    saved_before = {
        ("predicted_latency_ms" if k == "level_latency_ms" else k): v for k, v in sel.to_dict().items()
    }
    assert pomt.Selection.from_dict(saved_before) == sel  # JSON saved before the field's rename
    with pytest.raises(ValueError, match="missing"):
        pomt.Selection.from_dict({"r": 1})


# --------------------------------------------------------------------------- commands


@pytest.mark.parametrize("command", ["profile-latency", "estimate-accuracy", "select-r"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"pomt-{command}" in capsys.readouterr().out


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_pomt_subcommand_has_the_options_of_its_console_script(command):
    def options(parser):
        return sorted(s for action in parser._actions for s in action.option_strings)

    sub = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert options(sub.choices[command]) == options(cli.COMMANDS[command][0]())


def test_pomt_without_a_known_command_is_a_usage_error(capsys):
    for argv in ([], ["pomt-frobnicate"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
    assert "profile-latency" in capsys.readouterr().err


def test_class_labels_one_rule_for_wnids_and_other_names():
    from pomt.preprocessing import class_labels

    assert class_labels(["n01443537", "n01440764"]) == ({"n01443537": 1, "n01440764": 0}, True)
    assert class_labels(["n01443537", "n01440764"], imagenet=False) == (
        {"n01440764": 0, "n01443537": 1},
        False,
    )
    assert class_labels(["dog", "cat"]) == ({"cat": 0, "dog": 1}, False)
    with pytest.raises(ValueError, match=r"not wnids: \['cat'\]"):
        class_labels(["cat", "n01440764"], imagenet=True)


def test_commands_profile_estimate_and_select_from_saved_files(tmp_path, capsys):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for label in ("cat", "dog", "eel"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(3):
            pixels = (torch.rand(40, 40, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{i}.png")
    model = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--num-classes", "3"]
    acc_file, lat_file = tmp_path / "acc.json", tmp_path / "lat.json"
    assert cli.estimate_accuracy_main(
        [*model, "--data", str(tmp_path / "images"), "-o", str(acc_file), "--num-samples", "6",
         "--batch-size", "4", "--points", "3", "--no-progress"]
    ) == 0  # fmt: skip
    acc = AccuracyProfile.load(acc_file)
    assert acc.num_samples == 6 and acc.class_balanced and acc.num_classes == 3
    assert len(acc.grid) == 3 and (acc.grid[0], acc.grid[-1]) == (2, 5)  # p + 1 .. N
    assert cli.profile_latency_main(
        [*model, "-o", str(lat_file), "--tokens", "2-3,5", "--batch-size", "2", "--repeats", "2",
         "--warmup", "0", "--no-progress", "--plot", str(tmp_path / "lat.png")]
    ) == 0  # fmt: skip
    lat = LatencyProfile.load(lat_file, expect=dict(model="vit_tiny_patch16_224", batch_size=2))
    assert lat.grid == [2, 3, 5] and (tmp_path / "lat.png").is_file()
    capsys.readouterr()
    args = ["--latency", str(lat_file), "--accuracy", str(acc_file), "--alpha", "0.5"]
    assert (
        cli.main(["select-r", *args, "--plot", str(tmp_path / "sel.png"), "--json", str(tmp_path / "s.json")])
        == 0
    )
    out = capsys.readouterr().out
    chosen = json.loads((tmp_path / "s.json").read_text())
    assert out.strip().endswith(f"R={chosen['r']}") and chosen["n_star"] == 5 - chosen["r"]
    assert (tmp_path / "sel.png").read_bytes()[:4] == b"\x89PNG"
    # a profile for another batch size is refused with the field named, exit status 2
    assert cli.select_r_main([*args, "--batch-size", "8"]) == 2
    assert "batch_size" in capsys.readouterr().err


def test_device_cuda_n_makes_that_device_current(monkeypatch, capsys):
    chosen: list[torch.device] = []

    class Chosen(Exception):
        pass

    def set_device(device):
        chosen.append(torch.device(device))
        raise Chosen  # stop here: no GPU on this machine to profile on

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    for command in ("profile-latency", "estimate-accuracy"):
        extra = ["-o", "x.json"] if command == "profile-latency" else ["--data", "x", "-o", "x.json"]
        with pytest.raises(Chosen):  # before any model is built or timed
            cli.main([command, "--model", "vit_tiny_patch16_224", "--device", "cuda:1", *extra])
    assert chosen == [torch.device("cuda:1")] * 2

    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.append(device))
    for device in ("cpu", "cuda"):  # no index: nothing to select
        cli.select_device(device)
    assert len(chosen) == 2
    with pytest.raises(ValueError, match="this machine has 2 CUDA device"):
        cli.select_device("cuda:2")
    assert cli.main(["profile-latency", "--model", "m", "--device", "gpu:0", "-o", "x.json"]) == 2
    assert "is not a device" in capsys.readouterr().err


def test_the_latency_profile_records_the_kernels_it_timed(tmp_path):
    from conftest import make_tiny_vit

    from pomt import LatencyProfile, profile_latency

    model = make_tiny_vit()
    lat = profile_latency(
        model,
        target=Target(batch_size=1),
        progress=False,
        search=SearchConfig(grid=[17, 12]),
        timing=Timing(warmup=0, repeats=1),
    )
    assert lat.kernels == "torch"  # the CPU: POMT's block runs the torch path
    lat.save(tmp_path / "lat.json")
    assert LatencyProfile.load(tmp_path / "lat.json").kernels == "torch"


def test_timing_in_a_narrower_dtype_leaves_the_weights_bit_for_bit():
    """Casting to bf16 and back rounds every weight; the profiler puts the originals back."""
    from pomt.weights import weights_fingerprint

    model = make_tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fingerprint = weights_fingerprint(model)
    pomt.profile_latency(
        model,
        target=Target(batch_size=1, dtype="bfloat16"),
        layer=1,
        progress=False,
        search=SearchConfig(grid=[17, 9]),
        timing=Timing(min_run_time=0.0),
    )
    assert weights_fingerprint(model) == fingerprint
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_profile_records_the_sawtooth_period_its_search_found(tmp_path):
    model = make_tiny_vit(img_size=64)  # N = 65

    def sawtooth(n: int) -> TimingStats:  # every multiple of 16 a fifth faster than the trend
        return TimingStats.from_samples([(10.0 + 0.1 * n) * (0.8 if n % 16 == 0 else 1.0)] * 3)

    lat = profile_latency(model, timing=sawtooth, progress=False)
    assert lat.period == 16
    assert LatencyProfile.load(lat.save(tmp_path / "lat.json")).period == 16
    flat = profile_latency(
        model, timing=lambda n: TimingStats.from_samples([10.0 + 0.1 * n] * 3), progress=False
    )
    assert flat.period == 0
    # a profile saved before profiles carried a period loads without one
    old = lat.to_dict()
    del old["period"]
    assert LatencyProfile.from_dict(old).period == 0
