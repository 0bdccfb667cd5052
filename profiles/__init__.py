"""Device profiles: the numbers the roofline predictor runs on, each with the source it came from.

Data flow: ``profiles/<name>.toml`` --tomllib--> :func:`parse_profile` (checks every field has a value and a
``source`` string) --> :class:`DeviceProfile` (memory bandwidth, per-precision peak rates, efficiency
factors). The ``host`` profile has no fixed peaks: ``host.toml`` holds only its efficiency factors, and the
peaks are measured at run time by ``nora_edge.bench.microbench`` (imported lazily, so this package stays data).

TOML layout (every number is an inline table ``{ value = ..., source = "...", estimate = bool }``)::

    name = "orin-agx-64gb"
    description = "..."
    [memory]      capacity_gb, bandwidth_gbs
    [gpu]         sms, clock_mhz                         (optional: CPUs have none)
    [peak_tflops] fp32, fp16, int8, int4                 (dense; int4 = weight-only on fp16 math)
    [efficiency]  compute, memory                        (fraction of peak a real runtime reaches)
    [gemv_tflops] any of fp32, fp16, int8, int4          (optional: batch-1 rate where the runtime's GEMV
                                                          kernel is compute-limited; measured on ``host``)
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from nora_edge.errors import InputError, ProfileError

PROFILE_DIR = Path(__file__).resolve().parent
PRECISIONS = ("fp32", "fp16", "int8", "int4")
HOST = "host"
_SECTIONS = {
    "memory": ("capacity_gb", "bandwidth_gbs"),
    "peak_tflops": PRECISIONS,
    "efficiency": ("compute", "memory"),
}
_OPTIONAL_SECTIONS = {"gpu": ("sms", "clock_mhz")}


@dataclass(frozen=True)
class Quantity:
    """A number with where it came from.

    Attributes:
        value: the number (units are in the field name: ``_gbs`` GB/s, ``_gb`` GB, TFLOP/s, fraction).
        source: document, measurement or arithmetic it came from.
        estimate: True for arithmetic or calibration rather than a published or measured figure.
    """

    value: float
    source: str
    estimate: bool = False


@dataclass(frozen=True)
class DeviceProfile:
    """What the roofline needs to know about a device.

    Attributes:
        name: profile name (the TOML file stem, or ``host``).
        description: one line for the report.
        memory: ``capacity_gb`` and ``bandwidth_gbs``.
        peak_tflops: dense peak per precision (``fp32``, ``fp16``, ``int8``, ``int4``), in TFLOP/s (TOPS).
        efficiency: ``compute`` and ``memory`` fractions of peak that a real runtime reaches.
        gpu: ``sms`` and ``clock_mhz`` when the device is a GPU.
        measured: True when the peaks were measured on this machine at run time.
        gemv_tflops: batch-1 (one activation row) rate per precision where it differs from the peak: ORT's
            CPU int8/int4 GEMV kernels dequantize and run integer dot products, and at batch 1 that work, not
            the weight stream, bounds them. Absent precisions use ``peak_tflops``.
    """

    name: str
    description: str
    memory: dict[str, Quantity]
    peak_tflops: dict[str, Quantity]
    efficiency: dict[str, Quantity]
    gpu: dict[str, Quantity] | None = None
    measured: bool = False
    gemv_tflops: dict[str, Quantity] | None = None

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self.memory["bandwidth_gbs"].value * 1e9

    def peak_flops_per_s(self, precision: str) -> float:
        """Dense peak of ``precision`` in FLOP/s (int4 is weight-only: its math runs at the fp16 rate)."""
        if precision not in self.peak_tflops:
            raise InputError(
                f"profile {self.name!r}: unknown precision {precision!r}; expected one of {PRECISIONS}"
            )
        return self.peak_tflops[precision].value * 1e12

    def rate_flops_per_s(self, precision: str, rows: int = 0) -> float:
        """Compute rate of a weight product with ``rows`` activation rows (1: a GEMV; 0: unknown)."""
        if rows == 1 and self.gemv_tflops and precision in self.gemv_tflops:
            return self.gemv_tflops[precision].value * 1e12
        return self.peak_flops_per_s(precision)

    def sources(self) -> list[tuple[str, float, str, bool]]:
        """Every number as (field, value, source, estimate) for the report's assumption list."""
        rows = []
        sections = {"memory": self.memory, "peak_tflops": self.peak_tflops, "efficiency": self.efficiency}
        if self.gpu:
            sections["gpu"] = self.gpu
        if self.gemv_tflops:
            sections["gemv_tflops"] = self.gemv_tflops
        for section, fields in sections.items():
            for key, q in fields.items():
                rows.append((f"{section}.{key}", q.value, q.source, q.estimate))
        return rows


def list_profiles() -> list[str]:
    """Names of the shipped profiles (TOML stems), ``host`` included, sorted."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load_profile(name: str, *, host_measurement: object | None = None) -> DeviceProfile:
    """Load a device profile by name.

    Args:
        name: one of :func:`list_profiles`.
        host_measurement: for ``host`` only, a ``nora_edge.bench.microbench.HostMeasurement`` to use instead
            of measuring now (the measurement takes a few hundred ms).

    Raises:
        InputError: unknown name.
        ProfileError: the TOML is malformed (names the file and field).
    """
    path = PROFILE_DIR / f"{name}.toml"
    if not isinstance(name, str) or not path.is_file():
        raise InputError(f"unknown device profile {name!r}; available: {list_profiles()}")
    if name == HOST:
        from nora_edge.bench.microbench import host_profile, measure_host

        return host_profile(host_measurement if host_measurement is not None else measure_host())
    return load_profile_file(path)


def load_profile_file(path: Path) -> DeviceProfile:
    """Read and validate one profile TOML file (see the module docstring for the layout)."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ProfileError(f"{path}: cannot read profile ({e})") from e
    return parse_profile(data, str(path))


def parse_profile(data: dict, source: str, *, measured: bool = False) -> DeviceProfile:
    """Validate a parsed profile mapping; ``source`` names the file in error messages."""
    for key in ("name", "description"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise ProfileError(f"{source}: missing string field '{key}'")
    sections = {s: _section(data, s, keys, source) for s, keys in _SECTIONS.items()}
    gpu = _section(data, "gpu", _OPTIONAL_SECTIONS["gpu"], source) if "gpu" in data else None
    gemv = None
    if "gemv_tflops" in data:
        table = data["gemv_tflops"]
        unknown = sorted(set(table) - set(PRECISIONS)) if isinstance(table, dict) else [table]
        if unknown or not table:
            raise ProfileError(
                f"{source}: [gemv_tflops] keys {unknown or '(none)'}; expected some of {PRECISIONS}"
            )
        gemv = _section(data, "gemv_tflops", tuple(k for k in PRECISIONS if k in table), source)
    for key, q in sections["efficiency"].items():
        if not 0 < q.value <= 1:
            raise ProfileError(f"{source}: efficiency.{key} = {q.value} must be in (0, 1]")
    return DeviceProfile(
        name=data["name"],
        description=data["description"],
        memory=sections["memory"],
        peak_tflops=sections["peak_tflops"],
        efficiency=sections["efficiency"],
        gpu=gpu,
        measured=measured,
        gemv_tflops=gemv,
    )


def _section(data: dict, section: str, keys: tuple[str, ...], source: str) -> dict[str, Quantity]:
    table = data.get(section)
    if not isinstance(table, dict):
        raise ProfileError(f"{source}: missing table [{section}]")
    out = {}
    for key in keys:
        out[key] = _quantity(table.get(key), f"{section}.{key}", source)
    return out


def _quantity(entry: object, field: str, source: str) -> Quantity:
    if not isinstance(entry, dict):
        raise ProfileError(
            f"{source}: field '{field}' must be {{ value = ..., source = \"...\" }}, got {entry!r}"
        )
    value, src, est = entry.get("value"), entry.get("source"), entry.get("estimate", False)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ProfileError(f"{source}: field '{field}.value' = {value!r} must be a positive number")
    if not isinstance(src, str) or not src.strip():
        raise ProfileError(f"{source}: field '{field}' has no 'source' string")
    if not isinstance(est, bool):
        raise ProfileError(f"{source}: field '{field}.estimate' = {est!r} must be true or false")
    return Quantity(float(value), src.strip(), est)


__all__ = [
    "PRECISIONS",
    "DeviceProfile",
    "ProfileError",
    "Quantity",
    "list_profiles",
    "load_profile",
    "load_profile_file",
    "parse_profile",
]
