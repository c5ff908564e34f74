"""Temperature scaling and ECE on logits whose calibration is known, and what inspect reads
from one scoring pass (top losses, most confused): no model, no images."""

import json

import pytest
import torch
import torch.nn.functional as F

from finetune.errors import FinetuneError
from finetune.inference.calibration import (
    MIN_MISTAKES,
    calibrate,
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
    save_temperature,
    stored_temperature,
)
from finetune.inference.inspect import Scored, most_confused, top_correct, top_losses


def drawn(temperature: float, n: int = 2000, classes: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels drawn from softmax(logits / temperature): a model over-confident by
    `temperature` > 1, so dividing its logits by that temperature calibrates it exactly."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=gen, dtype=torch.float64) * 3
    labels = torch.multinomial((logits / temperature).softmax(1), 1, generator=gen).flatten()
    return logits, labels


def test_the_fitted_temperature_is_the_one_the_labels_were_drawn_at():
    logits, labels = drawn(2.0)
    assert fit_temperature(logits, labels) == pytest.approx(2.0, rel=0.1)


def test_scaling_an_over_confident_model_lowers_nll_and_ece_held_out_too():
    logits, labels = drawn(2.5)
    report = calibrate(logits, labels)
    assert report.nll_after_fit < report.nll_before
    assert report.ece_after_fit < report.ece_before / 2
    assert report.ece_after_heldout < report.ece_before / 2
    assert all(t == pytest.approx(2.5, rel=0.15) for t in report.half_temperatures)


def test_a_calibrated_model_keeps_a_temperature_near_one_and_its_nll():
    logits, labels = drawn(1.0)
    report = calibrate(logits, labels)
    assert report.temperature == pytest.approx(1.0, abs=0.1)
    assert report.nll_after_fit <= report.nll_before


@pytest.mark.parametrize("seed", range(6))
def test_the_kept_temperature_never_raises_ece_on_the_images_it_was_fitted_on(seed):
    """A model calibrated already: the NLL fit lands near 1 on either side, and where it would
    raise ECE on its own images it is not kept (issue 27: ECE after scaling not worse)."""
    logits, labels = drawn(1.0, n=300, seed=seed)
    report = calibrate(logits, labels)
    assert report.ece_after_fit <= report.ece_before
    assert report.fitted == (report.temperature != 1.0)
    assert report.fitted or "raised ECE" in report.fit


def separated(wrong: int, n: int = 200, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Confident logits, right on every image but the first `wrong`."""
    logits, labels = drawn(1.0, n, classes, seed=1)
    labels = logits.argmax(1)
    labels[:wrong] = (labels[:wrong] + 1) % classes
    return logits, labels


def test_a_set_with_no_mistakes_keeps_temperature_one_and_says_so():
    """Its NLL falls all the way to T = 0 and L-BFGS stops anywhere on the way (below 1):
    kept, that temperature would make predict --calibrated surer of a model known to be perfect."""
    logits, labels = separated(0)
    assert fit_temperature(logits, labels) < 0.9
    report = calibrate(logits, labels)
    assert report.temperature == 1.0 and report.half_temperatures == [1.0, 1.0] and not report.fitted
    assert report.fit == f"temperature 1, not fitted: 0 wrong images to fit on (needs at least {MIN_MISTAKES})"
    assert report.ece_after_fit == report.ece_before and report.nll_after_fit == report.nll_before
    assert json.loads(json.dumps(report.to_json()))["fitted"] is False


def test_a_few_mistakes_are_too_few_and_enough_are_fitted():
    assert not calibrate(*separated(MIN_MISTAKES - 1)).fitted
    report = calibrate(*separated(MIN_MISTAKES * 4))
    assert report.fitted and report.temperature != 1.0
    assert report.fit == f"fitted on 200 images, {MIN_MISTAKES * 4} of them wrong"


def test_ece_by_hand():
    """Two bins used: 0.9 confident and right 3 of 4 times, 0.6 confident and right 1 of 2."""
    probs = torch.tensor([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 2)
    labels = torch.tensor([0, 0, 0, 1, 0, 1])
    expected = 4 / 6 * abs(0.75 - 0.9) + 2 / 6 * abs(0.5 - 0.6)
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)
    bins = reliability_bins(probs, labels)
    assert sum(bins.count) == 6 and sorted(c for c in bins.count if c) == [2, 4]


def test_the_temperature_is_kept_for_its_own_checkpoint_only(tmp_path):
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"weights")
    with pytest.raises(FinetuneError, match="run `finetune inspect .*best.pt` first"):
        stored_temperature(ckpt)
    path = save_temperature(ckpt, 1.7, "12 validation images")
    assert path.name == "best.temperature.json" and json.loads(path.read_text())["temperature"] == 1.7
    assert stored_temperature(ckpt) == 1.7
    ckpt.write_bytes(b"weights trained again")
    with pytest.raises(FinetuneError, match="fitted for an earlier best.pt; run `finetune inspect"):
        stored_temperature(ckpt)
    with pytest.raises(FinetuneError, match="exported model"):
        stored_temperature(tmp_path / "best.onnx")


def scored() -> Scored:
    """Six images of three classes: two cats taken for dogs, one dog for a cat."""
    logits = torch.tensor(
        [[5.0, 0, 0], [0, 3, 0], [0, 1, 0], [2, 0, 0], [0, 4, 0], [0, 0, 6]],
    )
    return Scored(logits, torch.tensor([0, 0, 0, 1, 1, 2]), ["cat", "dog", "frog"])


def test_top_losses_and_top_correct_follow_the_losses():
    s = scored()
    losses = F.cross_entropy(s.logits, s.labels, reduction="none")
    assert top_losses(s, 3) == losses.argsort(descending=True)[:3].tolist() == [1, 3, 2]
    assert top_correct(s, 10) == [5, 0, 4], "only right ones, surest first"


def test_most_confused_counts_each_direction():
    table = most_confused(scored())
    assert table.to_dict("records") == [
        {"true": "cat", "predicted": "dog", "images": 2, "share_of_true": pytest.approx(2 / 3)},
        {"true": "dog", "predicted": "cat", "images": 1, "share_of_true": 0.5},
    ]


def test_a_model_that_gets_everything_right_has_no_confusions_and_still_draws():
    from finetune.inference.inspect_plots import confused_figure, shown_figure

    s = Scored(torch.eye(3) * 4, torch.arange(3), ["cat", "dog", "frog"])
    assert most_confused(s).empty and list(most_confused(s).columns) == ["true", "predicted", "images", "share_of_true"]
    assert sorted(top_correct(s, 5)) == [0, 1, 2]
    for figure in (confused_figure([]), shown_figure([], "Most wrong")):
        assert figure.get_axes(), "a figure that says there is nothing to show"
