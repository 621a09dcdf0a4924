"""Shared by bench/scale.sh and bench/cells.sh: reading a flotilla-sim rung's
output (report.json, the baseline) and the hub's own latencies."""
import glob
import json
import os
import sqlite3


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except Exception:
        return None


def hub_latency(rung_dir, campaign_id, db_path=None):
    """Per device: campaign creation to the hub recording its outcome (from the hub's own SQLite,
    <rung_dir>/hub/hub.db unless db_path names it; with cell files the rows are in
    cells/<n>/devices.db beside it)."""
    try:
        path = db_path or rung_dir + '/hub/hub.db'
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        (created,) = db.execute("select created_ms from campaigns where id=?", (campaign_id,)).fetchone()
        files = [path] + sorted(glob.glob(os.path.join(os.path.dirname(path), "cells", "*", "devices.db")))
        lat = []
        for f in files:
            part = sqlite3.connect(f"file:{f}?mode=ro", uri=True)
            lat += [r[0] - created for r in part.execute(
                "select updated_ms from campaign_devices where campaign_id=? and status in ('applied','failed')",
                (campaign_id,))]
        lat.sort()
        if not lat:
            return None
        pick = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] / 1000
        return {"p50": pick(0.5), "p99": pick(0.99), "p999": pick(0.999), "max": lat[-1] / 1000}
    except Exception:
        return None


def fmt(v, unit="", nd=1):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}{unit}"
    return f"{v}{unit}"
