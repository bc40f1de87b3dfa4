import json

import numpy as np
import pytest
from conftest import TINY
from sklearn import metrics as skm

from patchknn.config import preset
from patchknn.evaluation import evaluate, evaluate_category, markdown_table, paper_table2

RUNTIME = {k: v for k, v in TINY.items() if k in ("weights", "progress")}
CONFIG = dict(backbone="resnet50", image_size=64, grid_size=8)


def test_paper_table_is_complete():
    table = paper_table2()
    assert len(table) == 16
    assert table["bottle"] == 0.773 and table["screw"] == 0.386 and table["mean"] == 0.545
    assert np.mean([v for k, v in table.items() if k != "mean"]) == pytest.approx(0.545, abs=0.001)


def test_evaluate_category_on_synthetic(synthetic_root):
    ev = evaluate_category(synthetic_root, "synthetic", preset("paper", **CONFIG), **RUNTIME)
    row = ev.metrics
    # the row's metrics are those of the returned arrays, computed here by scikit-learn
    y, s = ev.masks.ravel(), ev.maps.ravel().astype(np.float64)
    assert row["pixel_auprc"] == pytest.approx(skm.average_precision_score(y, s), abs=1e-9)
    assert row["pixel_auroc"] == pytest.approx(skm.roc_auc_score(y, s), abs=1e-9)
    assert row["image_auroc"] == pytest.approx(skm.roc_auc_score(ev.labels, ev.scores), abs=1e-9)
    precision, recall, _ = skm.precision_recall_curve(y, s)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0)
    assert row["pixel_f1_max"] == pytest.approx(f1.max(), abs=1e-9)
    # AUPRO has no scikit-learn twin; patchknn.metrics.aupro is checked against a threshold loop in
    # test_metrics.py, so here: the row holds the AUPRO of these maps and masks at the 0.3 limit
    from patchknn.metrics import aupro

    assert row["aupro"] == aupro(ev.maps, ev.masks, 0.3)
    # the image scores are the predictions' scores of the same images, in the samples' order
    assert [s.label for s in ev.samples] == ev.labels.tolist()
    np.testing.assert_array_equal(ev.scores, [p.score for p in ev.model.predict([s.path for s in ev.samples])])
    assert row["n_train"] == 8 and row["n_test"] == 8 and row["n_test_defective"] == 5
    assert ev.maps.shape == ev.masks.shape == (8, 64, 64)
    assert ev.masks[ev.labels == 0].sum() == 0
    assert ev.masks[ev.labels == 1].any()
    assert row["paper_pixel_auprc"] is None


def test_original_resolution(synthetic_root):
    ev = evaluate_category(
        synthetic_root, "synthetic", preset("paper", **CONFIG), resolution="original", **RUNTIME
    )
    assert ev.maps.shape == (8, 96, 96)


def test_results_document_and_table(synthetic_root):
    results = evaluate(synthetic_root, ["synthetic"], preset("paper", **CONFIG), **RUNTIME)
    assert set(results) >= {"config", "categories", "mean"}
    assert results["mean"]["pixel_auprc"] == results["categories"]["synthetic"]["pixel_auprc"]
    table = markdown_table(results)
    assert "| synthetic |" in table and "paper (Table 2)" in table


@pytest.mark.mvtec
def test_bottle_reproduces_paper(bottle_evaluation):
    """The paper's method on the real bottle category: pixel AUPRC >= 0.77 (paper: 0.773).

    ``bottle_evaluation`` (conftest) runs ``patchknn evaluate --data-root ROOT --category bottle
    --weights FILE --output results.json --report DIR`` once: the default, Keras' ResNet-50 (0.7912,
    201 components, measured; the Caffe stem gives 0.7884 with 167, docs/paper-network.md).
    """
    results = bottle_evaluation.results
    row = results["categories"]["bottle"]
    print(json.dumps(row, indent=2))
    assert row["n_train"] == 209 and row["n_test"] == 83
    assert row["pixel_auprc"] >= 0.77
    assert abs(row["pixel_auprc"] - 0.773) <= 0.03
    assert row["image_auroc"] >= 0.95
    assert abs(row["pixel_auprc"] - 0.7912) <= 0.002  # the measured reproduction, not just the paper's band
    assert row["n_components"] == 201
    assert results["config"]["backbone"] == "resnet50-keras"
    assert results["config"]["layers"] == ["layer1", "layer2", "layer3"]
