"""The results tables, the paired rows and the per-method verdicts (benchmarks/report.py)."""

from __future__ import annotations

from benchmarks import report


def _run(method, recon, seed, acc, reference=None):
    return {"method": method, "recon": recon, "seed": seed, "reference": reference,
            "metrics": {"knn": acc}}


def test_table_renderer_fixed_inputs():
    runs = [
        _run("random-init", False, 0, 30.0, "random-init"),
        _run("m", False, 0, 40.0), _run("m", {"weight": 1}, 0, 42.0),
        _run("m", False, 1, 41.0), _run("m", {"weight": 1}, 1, 44.0),
        _run("n", False, 0, 50.0), _run("n", {"weight": 1}, 0, 49.0),
        _run("n", False, 1, 52.0), _run("n", {"weight": 1}, 1, 53.0),
    ]
    table = report.render_table(runs, ["knn"])
    lines = table.strip().splitlines()
    assert lines[0] == "| run | knn |"
    assert lines[2] == "| random-init | 30.0 (n=1) |"
    assert "| m | 40.5 ± 0.7 |" in lines
    assert "| m +recon | 43.0 ± 1.4 |" in lines
    assert "| m: +recon − base (paired) | +2.5 ± 0.7 (2/2 seeds up; +recon better) |" in lines
    # base vs the random-init run of the same seed (only seed 0 has one): one pair, no std
    assert ("| m: base − random-init (paired) | +10.0 (n=1) (1/1 seeds up; unclear: one "
            "seed) |") in lines
    runs.append(_run("random-init", False, 1, 42.0, "random-init"))
    lines = report.render_table(runs, ["knn"]).strip().splitlines()
    # m: 40 - 30 and 41 - 42 -> +4.5 ± 7.8; n: 50 - 30 and 52 - 42 -> +15.0 ± 7.1
    assert ("| m: base − random-init (paired) | +4.5 ± 7.8 (1/2 seeds up; no clear "
            "difference) |") in lines
    assert ("| n: base − random-init (paired) | +15.0 ± 7.1 (2/2 seeds up; beats random "
            "init) |") in lines
    # n: diffs -1 and +1 -> mean 0 with std 1.4: no clear difference
    assert any(line.startswith("| n: +recon − base (paired) | +0.0 ± 1.4 (1/2 seeds up; no clear"
                               ) for line in lines)


def test_one_seed_says_n1_never_plus_minus_zero():
    runs = [_run("m", False, 0, 40.0), _run("m", {"weight": 1}, 0, 42.0)]
    lines = report.render_table(runs, ["knn"]).strip().splitlines()
    assert "| m | 40.0 (n=1) |" in lines
    assert "| m: +recon − base (paired) | +2.0 (n=1) (1/1 seeds up; unclear: one seed) |" in lines
    assert not any("± 0.0" in line for line in lines)


def _matrix(base, plus, random, only):
    """Runs of method m over seeds: base / +recon / random-init / recon-only accuracies."""
    runs = []
    for seed, (b, p, r, o) in enumerate(zip(base, plus, random, only)):
        runs += [_run("m", False, seed, b), _run("m", {"weight": 1}, seed, p),
                 _run("random-init", False, seed, r, "random-init"),
                 _run("recon-only", {"weight": 1}, seed, o, "recon-only")]
    return runs


def test_recon_only_paired_row():
    runs = _matrix([40, 41, 42], [45, 47, 46], [30, 30, 30], [44, 44, 44])
    lines = report.render_table(runs, ["knn"]).strip().splitlines()
    assert ("| m: +recon − recon-only (paired) | +2.0 ± 1.0 (3/3 seeds up; +recon better) |"
            in lines)


def test_verdicts_follow_the_paired_rule():
    yes = report.verdicts(_matrix([40, 41, 42], [45, 47, 46], [30, 30, 30], [44, 44, 44]),
                          ["knn"])["m"]
    assert yes["answer"] == "yes" and "knn" in yes["reason"]
    no = report.verdicts(_matrix([40, 41, 42], [40, 42, 41], [30, 30, 30], [44, 44, 44]),
                         ["knn"])["m"]
    assert no["answer"] == "no" and no["reason"] == "no clear difference on any metric"
    worse = report.verdicts(_matrix([40, 41, 42], [37, 38, 38], [30, 30, 30], [44, 44, 44]),
                            ["knn"])["m"]
    assert worse["answer"] == "no" and "clearly worse" in worse["reason"]
    # a base method that did not learn: nothing to upgrade, whatever +recon does
    flat = report.verdicts(_matrix([30, 31, 29], [45, 47, 46], [30, 30, 30], [44, 44, 44]),
                           ["knn"])["m"]
    assert flat["answer"] == "unclear" and "does not clearly beat" in flat["reason"]
    one = report.verdicts(_matrix([40], [45], [30], [44]), ["knn"])["m"]
    assert one["answer"] == "unclear" and one["reason"] == "fewer than two seeds"
    text = report.render_verdicts(_matrix([40, 41, 42], [45, 47, 46], [30, 30, 30],
                                          [44, 44, 44]), ["knn"])
    assert text.startswith("- **m: yes**") and "+recon − recon-only: knn +2.0 ± 1.0" in text


def test_a_method_without_a_recon_run_yet_gets_a_verdict_line():
    runs = [_run("m", False, 0, 40.0), _run("random-init", False, 0, 30.0, "random-init")]
    assert report.render_verdicts(runs, ["knn"]) == "- **m: unclear** (no +recon row yet)."
    recon_only = [_run("m", True, 0, 42.0), runs[1]]  # an ablation of one knob: no base row
    assert report.render_verdicts(recon_only, ["knn"]) == (
        "- **m: unclear** (no base row: this matrix varies the objective only).")
    apart = [_run("m", False, 0, 40.0), _run("m", True, 1, 42.0)]
    assert report.render_verdicts(apart, ["knn"]) == (
        "- **m: unclear** (its base and +recon rows share no seed yet).")


def test_a_method_pairs_with_the_recon_only_run_on_its_own_recipe():
    # two methods, one shared recon-only row (the first method's, no ref_from) and one on n's
    # recipe: m pairs with the shared row, n with its own, never with the other's
    runs = []
    for seed, (shared, own) in enumerate([(44.0, 40.0), (45.0, 41.0)]):
        runs += [_run("m", {"weight": 1}, seed, 46.0 + seed), _run("m", False, seed, 43.0),
                 _run("n", {"weight": 1}, seed, 42.0 + seed), _run("n", False, seed, 39.0),
                 _run("recon-only", {"weight": 1}, seed, shared, "recon-only (net)"),
                 {**_run("recon-only", {"weight": 1}, seed, own, "recon-only (net, n's recipe)"),
                  "ref_from": "n"}]
    lines = report.render_table(runs, ["knn"]).strip().splitlines()
    # m: 46 - 44, 47 - 45 -> +2.0; n: 42 - 40, 43 - 41 -> +2.0 (against the shared row: -2.0)
    assert "| m: +recon − recon-only (paired) | +2.0 ± 0.0 (2/2 seeds up; +recon better) |" \
        in lines
    assert "| n: +recon − recon-only (paired) | +2.0 ± 0.0 (2/2 seeds up; +recon better) |" \
        in lines
    assert "| recon-only (net, n's recipe) | 40.5 ± 0.7 |" in lines
    # once n has its own row on one seed, its other seeds have no pair (recipes never mixed)
    partial = [r for r in runs if not (r.get("ref_from") and r["seed"] == 1)]
    assert "| n: +recon − recon-only (paired) | +2.0 (n=1) (1/1 seeds up; unclear: one seed) |" \
        in report.render_table(partial, ["knn"]).splitlines()
    # a method without its own row and without a shared one has no recon-only pair
    alone = [r for r in runs if r.get("ref_from") or r["reference"] is None]
    assert not any("m: +recon − recon-only" in line
                   for line in report.render_table(alone, ["knn"]).splitlines())


def test_the_evaluation_line_tells_no_batchnorm_from_no_recalibration():
    def runs(*infos):
        return [{"evaluation": {"bn_recalibration": info}} for info in infos]

    vit = {"bn_layers": 0, "images": 0}
    cnn = {"bn_layers": 20, "images": 10000}
    off = {"bn_layers": None, "images": 0}
    assert report.evaluation_lines(runs(vit, vit)) == [
        "- no BatchNorm layer in these networks: nothing to recalibrate before evaluation."]
    assert report.evaluation_lines(runs(off))[0].startswith(
        "- BatchNorm statistics NOT recalibrated")
    assert report.evaluation_lines([{}])[0].startswith("- BatchNorm statistics NOT recalibrated")
    mixed = report.evaluation_lines(runs(cnn, vit))[0]
    assert "recalibrated on 10000 clean training images" in mixed
    assert mixed.endswith("The networks without BatchNorm had nothing to recalibrate.")


def _full_run(method, recon, seed, reference=None, lr=0.1, images=100):
    cfg = {"backbone": {"name": "net"}, "data": {"dataset": "d", "per_class": 5, "batch_size": 8,
                                                 "augment": None},
           "train": {"epochs": 1, "lr": lr, "lr_schedule": "cosine", "weight_decay": 0.0},
           "eval": {"knn": {"k": 5}}}
    return {**_run(method, recon, seed, 1.0, reference), "config": cfg, "train_images": 50,
            "test_images": 10, "machine": "cpu", "wall_s": 6.0,
            "evaluation": {"bn_recalibration": {"images": images, "bn_layers": 3}}}


def test_setup_describes_each_row_and_the_recon_block_of_the_table_rows():
    """A reference row on another method's recipe gets its own line; the +recon block is the
    table's (the ablation's default point), not whichever run was recorded first; several
    blocks are each named with their rows."""
    point = _full_run("m", {"weight": 1, "head_out_scale": 4}, 0)  # an ablation point, first
    default = _full_run("m", {"weight": 1}, 0)
    refs = [_full_run("recon-only", {"weight": 1}, 0, "recon-only (net)"),
            _full_run("recon-only", {"weight": 1}, 0, "recon-only (net, n's recipe)", lr=0.5),
            _full_run("random-init", None, 0, "random-init (net)")]
    text = report.render_setup([point, default, *refs], [default, *refs])
    assert "- recon-only (net): backbone name=net;" in text
    assert "- recon-only (net, n's recipe): backbone name=net; d 50 train images (5/class) and " \
           "10 test images; 1 epochs, batch 8, SGD lr 0.5 (cosine)" in text
    assert '- +recon block: {"weight": 1}' in text and "head_out_scale" not in text
    both = report.render_setup([point, default], [point, default])
    assert ('- +recon blocks: {"weight": 1, "head_out_scale": 4} (m +recon); {"weight": 1} '
            '(m +recon)') in both
    assert "every network (random-init included) evaluated" in text
    assert "every network evaluated" in both  # no random-init row: not claimed


def test_setup_names_the_rows_that_were_not_recalibrated():
    runs = [_full_run("m", None, 0), _full_run("n", None, 0, images=0)]
    text = report.render_setup(runs)
    assert ("every network but n evaluated with its BatchNorm statistics recalibrated on 100 "
            "clean training images (no weight change). n: NOT recalibrated.") in text


def test_a_verdict_needs_a_random_init_row_and_counts_every_metric_of_the_table():
    """Without a random-init row nothing shows the base learned: "unclear", as the printed rule
    says; "most" counts the table's metrics, a metric without pairs as not better."""
    def run(recon, seed, a, b=None, reference=None):
        metrics = {"a": a} if b is None else {"a": a, "b": b}
        return {"method": "m" if not reference else reference, "recon": recon, "seed": seed,
                "reference": reference, "metrics": metrics}

    runs = [run(False, 0, 40.0, 40.0), run({"w": 1}, 0, 45.0), run(False, 1, 41.0, 41.0),
            run({"w": 1}, 1, 46.0)]  # +recon lacks metric b
    assert report.verdicts(runs, ["a"])["m"]["answer"] == "unclear"
    assert "no random-init row" in report.verdicts(runs, ["a"])["m"]["reason"]
    runs += [run(False, s, 30.0, 30.0, "random-init") for s in (0, 1)]
    assert report.verdicts(runs, ["a"])["m"]["answer"] == "yes"
    # clearly better on a, no pairs on b: one of two metrics is not "most"
    assert report.verdicts(runs, ["a", "b"])["m"]["answer"] == "unclear"


def test_rows_over_different_seed_counts_say_how_many():
    """A +recon row over 2 seeds beside a base over 3 shows each n; the paired row's "x/n"
    tells that it used the 2 seeds both have."""
    runs = [_run("m", False, s, v) for s, v in ((0, 50.0), (1, 50.0), (2, 40.0))]
    runs += [_run("m", {"weight": 1}, s, v) for s, v in ((0, 49.0), (1, 49.2))]
    lines = report.render_table(runs, ["knn"]).splitlines()
    assert "| m | 46.7 ± 5.8 (n=3) |" in lines and "| m +recon | 49.1 ± 0.1 (n=2) |" in lines
    assert any(line.startswith("| m: +recon − base (paired) | -0.9 ± 0.1 (0/2 seeds up")
               for line in lines)
