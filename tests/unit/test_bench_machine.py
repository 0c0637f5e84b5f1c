"""Benchmark results say which CPU features they ran with (bench/report.py machine())."""

from __future__ import annotations

from pathlib import Path

from bench.charts import _subtitle
from bench.report import machine

CPUINFO = """processor\t: 0
model name\t: {model}
flags\t\t: fpu sse2 {flags}

processor\t: 1
model name\t: another model
flags\t\t: fpu avx512f amx_int8
"""


def cpuinfo(tmp_path: Path, model: str, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO.format(model=model, flags=flags))
    return path


def test_the_widest_vector_extension_of_the_first_processor_is_recorded(tmp_path: Path) -> None:
    avx2 = machine(cpuinfo(tmp_path, "AMD EPYC", "avx avx2 fma"))
    assert avx2["cpu_model"] == "AMD EPYC"
    assert avx2["cpu_flags"] == ["avx2"]
    assert avx2["vector"] == "AVX2"
    avx512 = machine(cpuinfo(tmp_path, "Intel Xeon", "avx2 avx512f avx512_vnni"))
    assert avx512["cpu_flags"] == ["avx2", "avx512f", "avx512_vnni"]
    assert avx512["vector"] == "AVX-512"
    assert machine(cpuinfo(tmp_path, "Intel Xeon", "avx2 avx512f amx_int8"))["vector"] == "AMX"
    assert machine(cpuinfo(tmp_path, "old", "sse4_2"))["vector"] == "none of AVX2, AVX-512, AMX"


def test_without_cpuinfo_only_the_count_and_platform_are_recorded(tmp_path: Path) -> None:
    info = machine(tmp_path / "missing")
    assert set(info) == {"cpus", "platform"}


def test_chart_subtitles_name_the_vector_extension() -> None:
    when = {"finished_at": "2026-12-06T20:00:00+00:00"}
    assert _subtitle({"machine": {"cpus": 2, "vector": "AVX2"}, **when}) == (
        "2 CPUs (AVX2), 2026-12-06 20:00 UTC"
    )
    assert _subtitle({"machine": {"cpus": 2}, **when}) == "2 CPUs, 2026-12-06 20:00 UTC"
