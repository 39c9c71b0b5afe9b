"""The ONNX Runtime backend's sessions, on a graph built by hand (no export, so no model to trace)."""

from __future__ import annotations

from pathlib import Path

import pytest


def _cast_graph(path: Path) -> Path:
    """The smallest model OrtModel serves: `input_ids` (int64, batch x seq) cast to float `logits`."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT)],
        "cast",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq"])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.needs("onnx")
def test_a_session_runs_on_the_threads_torch_is_timed_with(tmp_path: Path) -> None:
    """ORT's rows are compared with torch's at `threads`; left unset, ONNX Runtime would take every
    core. Read back from the session itself: a record's `threads` field is only what was asked for."""
    from qatflash.ort import OrtModel

    options = OrtModel(_cast_graph(tmp_path / "cast.onnx"), threads=3).session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (3, 1)
