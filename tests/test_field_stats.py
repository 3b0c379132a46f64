"""Field statistics on real masks: matching, acceptance, clicks, aggregates, the comparison draw."""

import numpy as np
import pytest

from backend.config import compare_share
from backend.store.field_stats import FieldStats, draw_plain, plot_png, table


@pytest.fixture
def gt(datasets):
    from smartsam.eval.datasets import load_dataset, load_gt

    s = load_dataset(datasets / "GrabCut")[0]
    return load_gt(s)[0]


def test_accepted_edited_and_unmatched_objects(tmp_path, gt, database_url):
    st = FieldStats(tmp_path, database_url=database_url)
    other = np.zeros_like(gt)
    other[:20, :20] = True
    a = st.record_now("3", 7, "Object", "pure-is", "smartsam", 1, 2.5, gt)
    st.record("3", 7, "Object", "plain", "plain", 1, 0.4, other)
    edited = gt.copy()
    edited[gt.shape[0] // 2:] = False  # the annotator erased the lower half
    b = st.record_now("3", 8, "Object", "refine", "smartsam", 3, 1.0, gt)
    out = st.observe("3", 7, 100, [("r1", "Object", gt.copy())], lead_time=12.0)
    assert out == [dict(region="r1", label="Object", suggestion=a, mode="pure-is", arm="smartsam", iou=1.0,
                        accepted=True, clicks=1, extra_clicks=0)]
    out = st.observe("3", 8, 101, [("r1", "Object", edited), ("r2", "Other", gt)], lead_time=30.0)
    assert out[0]["suggestion"] == b and not out[0]["accepted"] and out[0]["extra_clicks"] == 2
    assert out[0]["iou"] == pytest.approx(edited.sum() / gt.sum(), abs=1e-6) and out[0]["iou"] < 1
    assert out[1]["suggestion"] is None  # no suggestion for that label: counted as unmatched
    # the same annotation seen again replaces its outcomes; a deleted one is forgotten
    st.observe("3", 8, 101, [("r1", "Object", edited)], lead_time=30.0)
    assert len(st.outcomes("3")) == 2
    s = st.summary("3")
    row = next(r for r in s["objects"] if r["arm"] == "smartsam")
    assert (row["objects"], row["accepted"], row["acceptance_rate"]) == (2, 1, 0.5)
    assert row["iou_mean"] == pytest.approx((1 + edited.sum() / gt.sum()) / 2, abs=1e-4)
    assert row["clicks_per_object"] == 2.0 and row["seconds_per_object"] == 21.0
    assert sum(row["iou_histogram"]) == 2 and row["iou_histogram"][-1] == 1
    assert {(x["arm"], x["suggestions"]) for x in s["served"]} >= {("plain", 1)}
    assert "| 3 | Object | smartsam | 2 | 1 | 0.50 |" in table(s)
    assert plot_png(s)[:4] == b"\x89PNG"
    st.forget(101)
    assert len(st.outcomes("3")) == 1


def test_only_suggestions_served_before_the_annotation_count(tmp_path, gt, database_url):
    """A pre-label made after the annotator submitted (a late Retrieve predictions, a read-back
    that made Label Studio predict) is not what they saw: it never takes the object's arm."""
    import time

    st = FieldStats(tmp_path, database_url=database_url)
    edited = gt.copy()
    edited[: gt.shape[0] // 3] = False
    seen = st.record_now("1", 5, "Object", "pure-is", "smartsam", 1, 1.0, edited)
    created = time.time()
    st.record_now("1", 5, "Object", "prelabel", "prelabel", 0, 1.0, gt)  # after the annotation, same object
    out = st.observe("1", 5, 9, [("r", "Object", gt.copy())], created_at=created)
    assert out[0]["suggestion"] == seen and out[0]["arm"] == "smartsam" and not out[0]["accepted"]
    # without the annotation's time the later pre-label would have won (the defect this guards)
    assert st.observe("1", 5, 9, [("r", "Object", gt.copy())])[0]["arm"] == "prelabel"


def test_queued_suggestions_are_written_at_close(tmp_path, gt, database_url):
    st = FieldStats(tmp_path, database_url=database_url)
    for k in range(20):
        st.record("2", k, "L", "pure-is", "smartsam", 1, 0.1, gt)  # queued, off the request path
    st.close()
    again = FieldStats(tmp_path, database_url=database_url)  # what a restarted process sees
    assert again.db.query_one("SELECT COUNT(*) FROM suggestions WHERE project='2'")[0] == 20
    assert st.lost == 0


def test_suggestions_are_bounded(tmp_path, gt, database_url):
    st = FieldStats(tmp_path, max_suggestions=5, database_url=database_url)
    ids = [st.record_now("1", k, "L", "pure-is", "smartsam", 1, 0.1, gt) for k in range(12)]
    n = st.db.query_one("SELECT COUNT(*), MIN(id) FROM suggestions")
    assert n == (5, ids[-5])


def test_compare_setting_and_seeded_draw():
    assert compare_share(None) == 0 and compare_share("plain:0.2") == 0.2
    for bad in ("plain", "sam:0.2", "plain:2", "plain:x"):
        with pytest.raises(ValueError):
            compare_share(bad)
    clicks = [(x * 3.0, y * 5.0) for x in range(20) for y in range(20)]
    draws = [draw_plain(0, 0.2, "1", 5, "Object", c) for c in clicks]
    assert 0.15 < np.mean(draws) < 0.25  # the configured share, over 400 first clicks
    assert draws == [draw_plain(0, 0.2, "1", 5, "Object", c) for c in clicks]  # seeded: the same again
    assert draws != [draw_plain(1, 0.2, "1", 5, "Object", c) for c in clicks]  # another seed, another split
    assert not any(draw_plain(0, 0.0, "1", 5, "Object", c) for c in clicks)


def test_a_polygon_served_and_submitted_unchanged_counts_as_accepted(tmp_path, gt, database_url):
    """A polygon rasterises to IoU < 1 with the mask it came from; it is still "accepted
    unchanged" when the submitted region is the one served, and edited when it is not."""
    from backend.labelstudio.label_config import LabelConfig
    from backend.labelstudio.regions import answer_results, region_shown_mask
    from backend.store.field_stats import raster_fingerprint

    from pathlib import Path

    cfg = LabelConfig.parse((Path(__file__).resolve().parents[1] / "label_config_polygon.xml").read_text())
    regions, shown = answer_results(gt, cfg, "Object", 0.9)
    st = FieldStats(tmp_path, database_url=database_url)
    st.record_now("4", 1, "Object", "pure-is", "smartsam", 1, 1.0, shown, "v", regions)
    first = regions[0]
    m = region_shown_mask(first)
    out = st.observe("4", 1, 50, [("p", "Object", m, raster_fingerprint(m))])
    assert out[0]["accepted"] and out[0]["iou"] < 1.0
    moved = dict(first, value=dict(first["value"], points=[[x + 2, y] for x, y in first["value"]["points"]]))
    m2 = region_shown_mask(moved)
    out = st.observe("4", 1, 51, [("p", "Object", m2, raster_fingerprint(m2))])
    assert not out[0]["accepted"] and out[0]["suggestion"] is not None


def test_suggestions_waiting_for_a_database_that_does_not_answer_are_bounded(tmp_path):
    """Another writer holds the database: the statistics writer waits, the suggestions served
    meanwhile queue up to QUEUE_MAX (each holding its mask), and the rest are dropped and counted
    instead of filling memory; once the database answers, what was queued is written."""
    import sqlite3

    from backend.store.field_stats import QUEUE_MAX, FieldStats

    st = FieldStats(tmp_path)
    mask = np.zeros((321, 481), bool)
    mask[100:200, 100:300] = True
    st.record("1", 0, "L", "pure-is", "smartsam", 1, 0.1, mask)
    st.flush()
    blocker = sqlite3.connect(tmp_path / "stats.db", timeout=0, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the database does not answer the writer
    n = QUEUE_MAX + 100
    for t in range(n):
        st.record("1", t, "L", "pure-is", "smartsam", 1, 0.1, mask)
    assert 99 <= st.dropped <= 100 and st.pending <= QUEUE_MAX
    blocker.execute("ROLLBACK")
    st.flush()
    assert st.db.count("suggestions") == 1 + n - st.dropped and st.lost == 0
    m = st.db.query_one("SELECT width, height FROM suggestions ORDER BY id DESC LIMIT 1")
    assert tuple(m) == (481, 321)
    st.close()


def test_a_flush_waits_for_what_was_served_before_it_never_for_clicks_that_keep_coming(tmp_path):
    """An annotation's outcomes first wait for the suggestions served before it. With clicks
    served faster than the writer stores them (its queue never empties) that wait ends once the
    earlier ones are written; while the database does not answer at all it ends after its time
    limit (StatsBehind), so the webhook's reference never waits on statistics. (Before: it waited
    for an empty queue, for ever while an annotator kept clicking.)"""
    import sqlite3
    import threading
    import time

    from backend.store.field_stats import StatsBehind

    st = FieldStats(tmp_path)
    mask = np.zeros((321, 481), bool)
    mask[100:200, 100:300] = True
    blocker = sqlite3.connect(tmp_path / "stats.db", timeout=0, isolation_level=None)
    st.record("1", 0, "L", "pure-is", "smartsam", 1, 0.1, mask)
    st.flush()
    blocker.execute("BEGIN IMMEDIATE")  # the database does not answer the writer
    st.record("1", 1, "L", "pure-is", "smartsam", 1, 0.1, mask)
    t0 = time.monotonic()
    with pytest.raises(StatsBehind, match="1 suggestions served earlier"):
        st.flush(timeout=1)
    assert time.monotonic() - t0 < 5
    blocker.execute("ROLLBACK")

    earlier = 2 + 50
    for t in range(2, earlier):
        st.record("1", t, "L", "pure-is", "smartsam", 1, 0.1, mask)
    stop = threading.Event()

    def annotator():  # far faster than the writer (~150/s here): the queue stays full, the rest is dropped
        while not stop.is_set():
            # in bursts: a full queue (512) takes the writer seconds to drain, so it is never empty
            # when the flush returns, even where a loaded machine leaves this thread waiting a while
            for _ in range(50):
                st.record("1", 999, "L", "pure-is", "smartsam", 1, 0.1, mask)
            time.sleep(0.001)  # not a busy loop: the writer gets its share of the GIL

    clicks = threading.Thread(target=annotator)
    clicks.start()
    try:
        time.sleep(0.2)
        assert st.pending > 0
        st.flush(timeout=60)
        assert st.pending > 0  # it returned while clicks were still waiting to be written
    finally:
        stop.set()
        clicks.join()
    assert st.db.query_one("SELECT COUNT(*) FROM suggestions WHERE task < 999")[0] == earlier
    st.close()


def test_nothing_is_queued_after_close_and_a_second_close_returns_at_once(tmp_path, gt):
    """At shutdown the pre-labeling worker may still serve a suggestion after the statistics were
    closed: it is counted as dropped instead of starting a second writer that a close would then
    wait 20 s for."""
    import time

    st = FieldStats(tmp_path)
    st.record("1", 0, "L", "pure-is", "smartsam", 1, 0.1, gt)
    st.close()
    st.record("1", 1, "L", "pure-is", "smartsam", 1, 0.1, gt)
    assert st.dropped == 1 and st.pending == 0
    t0 = time.monotonic()
    st.close()
    assert time.monotonic() - t0 < 1
    assert st.db.query_one("SELECT COUNT(*) FROM suggestions")[0] == 1
