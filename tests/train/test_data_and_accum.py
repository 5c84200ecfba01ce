"""`.parquet` training data and `--grad-accum`, which no other test reached."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from peftkit import cli
from peftkit.train import loop
from peftkit.train.data import load_examples
from tests.train.tiny import rows, write_jsonl


def test_parquet_rows_load_as_the_same_examples_as_jsonl(tmp_path):
    items = rows(6)
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(items), parquet)
    from_parquet = load_examples([str(parquet)])
    assert from_parquet == load_examples([str(write_jsonl(tmp_path / "rows.jsonl", items))])
    assert len(from_parquet) == 6 and from_parquet[1].response == items[1]["output"]


@pytest.mark.parametrize("accum", [1, 3])
def test_grad_accum_runs_that_many_micro_batches_per_step(train_args, tmp_path, monkeypatch, accum):
    """Each optimizer step draws `--grad-accum` micro-batches from the data stream, and the logged step count
    stays `--max-steps`."""
    drawn = []
    real = loop.micro_batches

    def counting(*args, **kwargs):
        for batch in real(*args, **kwargs):
            drawn.append(len(batch))
            yield batch

    monkeypatch.setattr(loop, "micro_batches", counting)
    out = tmp_path / f"accum{accum}"
    argv = train_args(
        out, "--max-steps", "2", "--save-every", "0", "--batch-size", "2", "--grad-accum", str(accum)
    )
    assert cli.main(argv) == 0
    assert len(drawn) == 2 * accum and all(n <= 2 for n in drawn)
    steps = [json.loads(line).get("step") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(s for s in steps if s is not None) == 2
