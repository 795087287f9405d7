"""Procedural scenes with exact RGB, depth, surface normals and alpha.

No machine that runs the tests can download weights or data sets, yet the training code must be
shown to *learn*. This module renders small indoor-like scenes by analytic ray casting, so every
target is known exactly: a tiny model trained on a few hundred of them on a CPU must beat an
untrained one on held-out scenes. It is pure numpy and vectorised (a 64x64 scene takes a few
milliseconds).

Conventions (the same as the rest of the repository, i.e. Marigold / Hypersim camera space):

* World frame: metres, origin at the camera centre, y up. A *level* camera has the identity
  rotation, and then the world frame is the camera frame.
* Camera frame: x right, y up, z towards the viewer (OpenGL); the camera looks along -z.
  Pixel (row i, column j) covers [j, j+1) x [i, i+1); its centre ray goes through
  (j + 0.5, i + 0.5).
* ``depth``: planar (z-buffer) depth in metres, i.e. the distance of the hit point along the
  optical axis, positive; 0 marks an invalid pixel.
* ``normal``: unit surface normal in the camera frame, flipped to face the camera
  (``dot(normal, view_ray) < 0``); the zero vector marks an invalid pixel. A fronto-parallel wall
  is (0, 0, 1); the floor seen by a level camera is (0, 1, 0).
* ``alpha``: the fraction of the pixel covered by foreground objects (the union of their visible
  coverage), 1 inside, 0 on the background, fractional on silhouettes.
* ``rgb``: albedo (solid colour, checker or stripes) times Lambertian shading from one directional
  light plus ambient, quantised to uint8.

Depth and normals are sampled at the pixel centre (never averaged across an edge, which would
create "flying pixels"). RGB and alpha are anti-aliased where it matters: pixels whose 3x3
neighbourhood sees more than one surface or box face are re-traced with ``supersample`` x
``supersample`` stratified sub-pixel rays and averaged, so a silhouette pixel obeys the
compositing equation ``rgb = alpha * foreground + (1 - alpha) * background``; texture boundaries
inside one surface are box-filtered analytically. Only edge pixels pay for anti-aliasing, which
keeps a 256x256 scene at a few tens of milliseconds.

Two levels of API:

* :func:`render` draws an explicitly given :class:`SceneDescription` (a :class:`Camera` and a
  list of :class:`Plane`, :class:`Sphere`, :class:`Box` and :class:`Rect` surfaces); the tests
  check exact geometry with it.
* :func:`render_scene` draws a random room (back wall, floor, optional side walls and ceiling)
  with 1-4 foreground objects from a seed and renders it; :func:`write_synthetic_dataset` and the
  command line write many of them in the plain training-folder format::

      python -m d3.data.synthetic --output DIR --num_scenes N --height H --width W --seed S
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Union

import numpy as np

__all__ = [
    "Box",
    "Camera",
    "Material",
    "Plane",
    "Rect",
    "SceneDescription",
    "Sphere",
    "SyntheticScene",
    "render",
    "render_scene",
    "rotation_matrix",
    "sample_scene",
    "scene_seed",
    "write_synthetic_dataset",
]

Vec3 = Union[Sequence[float], np.ndarray]
SeedLike = Union[int, Sequence[int], np.random.Generator]

TASKS = ("depth", "normal", "alpha")
PATTERNS = ("solid", "checker", "stripes")
_F = np.float32  # rays and hits are traced in float32: twice the speed, ample precision
_EPS = 1e-6  # smallest accepted ray parameter: hits at or behind the camera centre are ignored
_PARTS = 8  # surface parts (box faces) per surface in the anti-aliasing key


# --------------------------------------------------------------------------------------------
# Scene description
# --------------------------------------------------------------------------------------------


def _vec(v: Vec3) -> np.ndarray:
    return np.asarray(v, dtype=np.float64).reshape(3)


def _unit(v: Vec3) -> np.ndarray:
    v = _vec(v)
    norm = np.linalg.norm(v)
    if norm == 0:
        raise ValueError("expected a non-zero vector")
    return v / norm


def _matrix(rotation: np.ndarray | None) -> np.ndarray:
    return np.eye(3) if rotation is None else np.asarray(rotation, dtype=np.float64).reshape(3, 3)


def _column_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dot products of the columns of two (3, N) arrays."""
    return np.einsum("ij,ij->j", a, b)


def rotation_matrix(yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    """``R_y(yaw) @ R_x(pitch) @ R_z(roll)``, angles in degrees.

    Used as a camera-to-world (or local-to-world) rotation: positive yaw turns the camera's
    view (-z) to the left, positive pitch tilts it up, positive roll turns the image's x axis
    counter-clockwise.
    """
    y, p, r = np.radians([yaw, pitch, roll])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return ry @ rx @ rz


@dataclass(frozen=True, eq=False)
class Camera:
    """A pinhole camera at the world origin.

    ``focal`` is in pixels (fx = fy); the principal point defaults to the image centre.
    ``rotation`` is camera-to-world (``None``: a level camera, camera frame = world frame).
    """

    width: int
    height: int
    focal: float
    rotation: np.ndarray | None = None
    cx: float | None = None
    cy: float | None = None

    @classmethod
    def from_fov(
        cls, width: int, height: int, hfov_deg: float = 60.0, rotation: np.ndarray | None = None
    ) -> Camera:
        """A camera with the given horizontal field of view (degrees)."""
        return cls(width, height, (width / 2) / math.tan(math.radians(hfov_deg) / 2), rotation)

    @property
    def matrix(self) -> np.ndarray:
        return _matrix(self.rotation)

    def directions(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(3, N) world-frame rays through image points (x, y), scaled so their camera z is -1.

        With that scaling the ray parameter of a hit *is* its planar depth.
        """
        cx = self.width / 2 if self.cx is None else self.cx
        cy = self.height / 2 if self.cy is None else self.cy
        rays = np.empty((3, np.size(x)), dtype=_F)
        rays[0] = (x - cx) / self.focal
        rays[1] = (cy - y) / self.focal
        rays[2] = -1.0
        return rays if self.rotation is None else self.matrix.astype(_F) @ rays


@dataclass(frozen=True)
class Material:
    """Albedo of a surface: a solid colour, a checkerboard or stripes (colours in [0, 1]).

    ``period`` is the size of a checker cell / the width of a stripe in metres, measured in the
    surface's own (u, v) coordinates; ``angle`` (degrees) turns the stripes.
    """

    color: tuple[float, float, float] = (0.7, 0.7, 0.7)
    pattern: str = "solid"
    color2: tuple[float, float, float] = (0.2, 0.2, 0.2)
    period: float = 0.5
    angle: float = 0.0

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"Material.pattern must be one of {PATTERNS}, got {self.pattern!r}")
        if not self.period > 0:
            raise ValueError(f"Material.period must be positive, got {self.period}")

    @cached_property
    def _colors(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.color, dtype=_F)[:, None], np.asarray(self.color2, dtype=_F)[:, None]

    def cell(self, uv: np.ndarray | None) -> np.ndarray | int:
        """0 where the first colour shows, 1 where the second does; uv: (2, N), None if solid."""
        if self.pattern == "solid":
            return 0
        scale = 1.0 / self.period
        if self.pattern == "checker":
            u, v = np.floor(uv * scale).astype(np.int64)
            return (u + v) & 1
        a = math.radians(self.angle)
        across = uv[0] * (math.cos(a) * scale) + uv[1] * (math.sin(a) * scale)
        return np.floor(across).astype(np.int64) & 1

    def coverage(self, uv: np.ndarray, uv_dx: np.ndarray, uv_dy: np.ndarray) -> np.ndarray:
        """Fraction of each pixel's footprint showing the second colour (box filter).

        uv: (2, M) at pixel centres; uv_dx, uv_dy: their change per pixel along x and y. The
        footprint is the texture-space box spanned by the derivatives; checker = XOR of two
        stripe patterns, whose box-filtered means combine as a + b - 2ab.
        """
        scale = 1.0 / self.period
        if self.pattern == "solid":
            return np.zeros(uv.shape[1])
        if self.pattern == "checker":
            a, b = _stripe_mean(uv * scale, 0.5 * (np.abs(uv_dx) + np.abs(uv_dy)) * scale)
            return a + b - 2 * a * b
        direction = np.array([math.cos(math.radians(self.angle)), math.sin(math.radians(self.angle))]) * scale
        across = direction @ uv
        spread = 0.5 * (np.abs(direction @ uv_dx) + np.abs(direction @ uv_dy))
        return _stripe_mean(across, spread)

    def albedo(self, cell: np.ndarray | int) -> np.ndarray:
        """(3, N) colours of the given cells ((3, 1) for a scalar cell)."""
        first, second = self._colors
        if np.isscalar(cell):
            return second if cell else first
        return np.where(cell.astype(bool), second, first)


def _stripe_mean(x: np.ndarray, half_width: np.ndarray) -> np.ndarray:
    """Mean of ``floor(x) & 1`` over [x - half_width, x + half_width], in closed form."""

    def integral(s: np.ndarray) -> np.ndarray:  # of floor(s) & 1 from 0 to s
        pairs = np.floor(s / 2)
        return pairs + np.maximum(s - 2 * pairs - 1, 0.0)

    half_width = np.maximum(half_width, 1e-3)
    return (integral(x + half_width) - integral(x - half_width)) / (2 * half_width)


# Every surface answers two questions for (3, N) float32 rays from the origin:
#   intersect(dirs) -> (N,) ray parameter of its nearest hit in front of the camera, inf (or nan
#                      for degenerate rays) where it has none;
#   geometry(points, need_uv) -> (normals (3, M), uv (2, M) texture coordinates in metres or None,
#                                 part index (M,) or 0) at hit points (3, M).
# Normals need not be unit nor face the camera; the renderer fixes both. Constants are derived
# once (``_setup``) as Python floats or float32 arrays, so the per-ray arithmetic stays float32.


@dataclass(frozen=True, eq=False)
class Plane:
    """An infinite one-sided plane (a room boundary), visible from the side its normal points to.

    A convex room is the set of points in front of all its planes; the camera inside sees the
    nearest of them. Background by default.
    """

    point: Vec3
    normal: Vec3
    material: Material = Material()
    foreground: bool = False

    @cached_property
    def _setup(self):
        n = _unit(self.normal)
        hint = np.array([0.0, 1.0, 0.0]) if abs(n[1]) < 0.9 else np.array([0.0, 0.0, 1.0])
        e1 = _unit(np.cross(hint, n))  # horizontal on walls
        basis = np.stack([e1, np.cross(n, e1)])
        offset = float(n @ _vec(self.point))  # negative: the camera is in front of the plane
        return n.astype(_F), offset, basis.astype(_F), _vec(self.point).astype(_F)[:, None]

    def intersect(self, dirs: np.ndarray) -> np.ndarray:
        n, offset, _, _ = self._setup
        if offset >= 0:
            return np.full(dirs.shape[1], np.inf, dtype=_F)
        with np.errstate(divide="ignore"):
            t = offset / (n @ dirs)
        t[t <= _EPS] = np.inf  # rays leaving the plane's front side (t < 0, or -inf if parallel)
        return t

    def geometry(self, points: np.ndarray, need_uv: bool) -> tuple[np.ndarray, np.ndarray | None, int]:
        n, _, basis, point = self._setup
        uv = basis @ (points - point) if need_uv else None
        return np.broadcast_to(n[:, None], points.shape), uv, 0


@dataclass(frozen=True, eq=False)
class Sphere:
    center: Vec3
    radius: float
    material: Material = Material()
    foreground: bool = True

    @cached_property
    def _setup(self):
        c = _vec(self.center)
        power = float(c @ c - self.radius**2)  # > 0: the camera is outside
        return c.astype(_F), power, float(self.radius)

    def intersect(self, dirs: np.ndarray) -> np.ndarray:
        c, power, _ = self._setup
        b = c @ dirs
        a = _column_dot(dirs, dirs)
        disc = b * b - a * power
        root = np.sqrt(np.maximum(disc, 0.0))
        if power <= 0:  # inside: every ray hits the far side
            return (b + root) / a
        with np.errstate(divide="ignore"):
            t = power / (b + root)  # the near root, written without cancellation
        t[(disc < 0) | (t <= _EPS)] = np.inf
        return t

    def geometry(self, points: np.ndarray, need_uv: bool) -> tuple[np.ndarray, np.ndarray | None, int]:
        c, _, r = self._setup
        q = (points - c[:, None]) * (1.0 / r)
        if not need_uv:
            return q, None, 0
        # Longitude / latitude scaled to metres on the surface (a "beach ball" for checkers).
        uv = r * np.stack([np.arctan2(q[0], q[2]), np.arcsin(np.clip(q[1], -1.0, 1.0))])
        return q, uv, 0


@dataclass(frozen=True, eq=False)
class Box:
    """A box with half extents ``half_size`` along the axes of ``rotation`` (local-to-world)."""

    center: Vec3
    half_size: Vec3
    rotation: np.ndarray | None = None
    material: Material = Material()
    foreground: bool = True

    @cached_property
    def _setup(self):
        rot, half = _matrix(self.rotation), _vec(self.half_size)
        origin = -(rot.T @ _vec(self.center))  # the camera centre in box coordinates
        inside = bool(np.all(np.abs(origin) < half))
        slabs = [(-h - o, h - o) for h, o in zip(half.tolist(), origin.tolist())]
        return rot.astype(_F), slabs, inside, half.astype(_F)[:, None], _vec(self.center).astype(_F)[:, None]

    def intersect(self, dirs: np.ndarray) -> np.ndarray:
        rot, slabs, inside, _, _ = self._setup
        d = rot.T @ dirs
        near = far = None
        with np.errstate(divide="ignore", invalid="ignore"):
            for axis, (low, high) in enumerate(slabs):
                inv = 1.0 / d[axis]
                t1, t2 = low * inv, high * inv
                lo, hi = np.minimum(t1, t2), np.maximum(t1, t2)
                near = lo if near is None else np.maximum(near, lo)
                far = hi if far is None else np.minimum(far, hi)
        if inside:  # every ray hits a wall from within
            return far
        near[(near > far) | (near <= _EPS)] = np.inf
        return near

    def geometry(self, points: np.ndarray, need_uv: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        rot, _, _, half, center = self._setup
        local = rot.T @ (points - center)
        r0, r1, r2 = np.abs(local) / half
        axis = np.where((r0 >= r1) & (r0 >= r2), 0, np.where(r1 >= r2, 1, 2))  # the face's axis
        columns = np.arange(points.shape[1])
        positive = local[axis, columns] >= 0
        normal = np.zeros_like(local)
        normal[axis, columns] = np.where(positive, _F(1), _F(-1))
        uv = np.stack([local[(axis + 1) % 3, columns], local[(axis + 2) % 3, columns]]) if need_uv else None
        return rot @ normal, uv, 2 * axis + positive


@dataclass(frozen=True, eq=False)
class Rect:
    """A two-sided rectangle ("card"): local x, y of ``rotation`` span it, local z is its normal."""

    center: Vec3
    half_size: Sequence[float]
    rotation: np.ndarray | None = None
    material: Material = Material()
    foreground: bool = True

    @cached_property
    def _setup(self):
        rot = _matrix(self.rotation)
        local_center = (rot.T @ _vec(self.center)).tolist()  # offset along the normal last
        hu, hv = (float(s) for s in self.half_size)
        return rot.astype(_F), local_center, hu, hv, _vec(self.center).astype(_F)[:, None]

    def intersect(self, dirs: np.ndarray) -> np.ndarray:
        rot, (cu, cv, offset), hu, hv, _ = self._setup
        if offset == 0:  # the camera lies in the rectangle's plane
            return np.full(dirs.shape[1], np.inf, dtype=_F)
        d = rot.T @ dirs
        with np.errstate(divide="ignore", invalid="ignore"):
            t = offset / d[2]
            u, v = t * d[0] - cu, t * d[1] - cv
        t[(t <= _EPS) | ~(np.abs(u) <= hu) | ~(np.abs(v) <= hv)] = np.inf
        return t

    def geometry(self, points: np.ndarray, need_uv: bool) -> tuple[np.ndarray, np.ndarray | None, int]:
        rot, _, _, _, center = self._setup
        uv = rot[:, :2].T @ (points - center) if need_uv else None
        return np.broadcast_to(rot[:, 2:3], points.shape), uv, 0


Surface = Union[Plane, Sphere, Box, Rect]


@dataclass(eq=False)
class SceneDescription:
    """What :func:`render` draws. ``light_direction`` (world frame) points towards the light."""

    camera: Camera
    surfaces: list[Surface]
    light_direction: Vec3 = (-0.3, 0.8, 0.5)
    ambient: float = 0.35
    background: tuple[float, float, float] = (0.0, 0.0, 0.0)  # colour where no surface is hit


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class SyntheticScene:
    """One rendered scene (see the module docstring for the conventions)."""

    rgb: np.ndarray  # (H, W, 3) uint8
    depth: np.ndarray  # (H, W) float32, metres, 0 = invalid
    normal: np.ndarray  # (H, W, 3) float32, unit, camera frame, 0-vector = invalid
    alpha: np.ndarray  # (H, W) float32 in [0, 1]

    @property
    def valid_mask(self) -> np.ndarray:
        return self.depth > 0


@dataclass
class _Samples:
    """Per-ray results of :func:`_trace` (N rays)."""

    depth: np.ndarray  # (N,) planar depth, inf where nothing was hit
    normal: np.ndarray  # (3, N) world frame, unit, camera-facing; 0 where nothing was hit
    color: np.ndarray  # (3, N) shaded linear colour in [0, 1]
    shading: np.ndarray  # (N,) the factor applied to the albedo
    uv: np.ndarray  # (2, N) texture coordinates (0 on solid surfaces)
    foreground: np.ndarray  # (N,) bool
    key: np.ndarray  # (N,) surface, part and texture cell of the hit; -1 where nothing was hit


def _trace(scene: SceneDescription, x: np.ndarray, y: np.ndarray) -> _Samples:
    """Cast one ray per image point (x, y) and shade the nearest hit."""
    dirs = scene.camera.directions(x, y)
    count = dirs.shape[1]
    depth = np.full(count, np.inf, dtype=_F)
    owner = np.full(count, -1, dtype=np.int64)
    for k, surface in enumerate(scene.surfaces):
        t = surface.intersect(dirs)
        closer = t < depth
        np.copyto(depth, t, where=closer)
        owner[closer] = k

    # Shade surface by surface on contiguous runs of rays, sorted by the surface they hit.
    order = np.argsort(owner, kind="stable")
    starts = np.searchsorted(owner, np.arange(-1, len(scene.surfaces) + 1), sorter=order).tolist()
    dirs = np.take(dirs, order, axis=1)
    hit_depth = depth[order]
    normal = np.zeros((3, count), dtype=_F)
    color = np.empty((3, count), dtype=_F)
    color[:, : starts[1]] = np.asarray(scene.background, dtype=_F)[:, None]  # misses sort first
    shading = np.ones(count, dtype=_F)
    uv = np.zeros((2, count), dtype=_F)
    foreground = np.zeros(count, dtype=bool)
    key = np.full(count, -1, dtype=np.int64)
    light = _unit(scene.light_direction).astype(_F)
    ambient = float(scene.ambient)
    for k, surface in enumerate(scene.surfaces):
        run = slice(starts[k + 1], starts[k + 2])
        if run.start == run.stop:
            continue
        ray = dirs[:, run]
        material = surface.material
        n, surface_uv, part = surface.geometry(hit_depth[run] * ray, need_uv=material.pattern != "solid")
        facing = np.where(_column_dot(n, ray) > 0, _F(-1), _F(1))  # flip towards the camera
        n = n * (facing / np.sqrt(_column_dot(n, n)))
        cell = material.cell(surface_uv)
        normal[:, run] = n
        shading[run] = ambient + (1.0 - ambient) * np.maximum(light @ n, 0.0)
        color[:, run] = material.albedo(cell) * shading[run]
        if surface_uv is not None:
            uv[:, run] = surface_uv
        foreground[run] = surface.foreground
        key[run] = (k * _PARTS + part) * 2 + cell

    inverse = np.empty_like(order)
    inverse[order] = np.arange(count)
    return _Samples(
        depth=depth,
        normal=np.take(normal, inverse, axis=1),
        color=np.take(color, inverse, axis=1),
        shading=shading[inverse],
        uv=np.take(uv, inverse, axis=1),
        foreground=foreground[inverse],
        key=key[inverse],
    )


def _edge_pixels(key: np.ndarray) -> np.ndarray:
    """Pixels whose 8-neighbourhood holds more than one key: those that may straddle an edge."""
    h, w = key.shape
    padded = np.pad(key, 1, mode="edge")
    edge = np.zeros(key.shape, dtype=bool)
    for dy in range(3):
        for dx in range(3):
            if dy != 1 or dx != 1:
                edge |= padded[dy : dy + h, dx : dx + w] != key
    return edge


def _filter_textures(
    scene: SceneDescription, centre: _Samples, pixels: np.ndarray, color: np.ndarray
) -> None:
    """Anti-alias texture boundaries inside a surface by box-filtering the pattern analytically.

    ``pixels`` see one surface (and box face) in their whole 3x3 neighbourhood, so central
    differences of the texture coordinates give the pixel's footprint in texture space.
    """
    h, w = scene.camera.height, scene.camera.width
    rows, cols = np.divmod(pixels, w)
    uv = centre.uv.astype(np.float64)
    left, right = rows * w + np.maximum(cols - 1, 0), rows * w + np.minimum(cols + 1, w - 1)
    up, down = np.maximum(rows - 1, 0) * w + cols, np.minimum(rows + 1, h - 1) * w + cols
    uv_dx = (uv[:, right] - uv[:, left]) / (right - left)
    uv_dy = (uv[:, down] - uv[:, up]) / ((down - up) // w)
    surface_of = (centre.key[pixels] >> 1) // _PARTS
    for k in np.unique(surface_of).tolist():
        mine = surface_of == k
        material = scene.surfaces[k].material
        fraction = material.coverage(uv[:, pixels[mine]], uv_dx[:, mine], uv_dy[:, mine])
        first, second = material._colors
        albedo = first + (second - first) * fraction.astype(_F)
        color[:, pixels[mine]] = albedo * centre.shading[pixels[mine]]


def render(scene: SceneDescription, supersample: int = 3) -> SyntheticScene:
    """Render an explicit scene description.

    Pixels on a silhouette, crease or occlusion edge are re-traced with ``supersample`` x
    ``supersample`` stratified sub-pixel rays to anti-alias RGB and alpha; texture boundaries
    within a surface are box-filtered analytically. ``supersample=1`` turns both off (alpha is
    then binary, textures point-sampled).
    """
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    camera = scene.camera
    h, w = camera.height, camera.width
    rows, cols = np.divmod(np.arange(h * w), w)
    centre = _trace(scene, cols + 0.5, rows + 0.5)

    color = centre.color
    alpha = centre.foreground.astype(_F)
    if supersample > 1:
        keys = centre.key.reshape(h, w)
        geometric = _edge_pixels(keys >> 1)  # key >> 1: surface and part, without texture cell
        textured = _edge_pixels(keys) & ~geometric
        _filter_textures(scene, centre, np.flatnonzero(textured), color)

        pixels = np.flatnonzero(geometric)
        offsets = (np.arange(supersample) + 0.5) / supersample
        sub_x = (cols[pixels, None, None] + offsets[None, None, :]).repeat(supersample, axis=1)
        sub_y = (rows[pixels, None, None] + offsets[None, :, None]).repeat(supersample, axis=2)
        sub = _trace(scene, sub_x.ravel(), sub_y.ravel())
        per_pixel = supersample * supersample
        color[:, pixels] = sub.color.reshape(3, pixels.size, per_pixel).mean(axis=2)
        alpha[pixels] = sub.foreground.reshape(pixels.size, per_pixel).mean(axis=1)

    depth = centre.depth
    depth[~np.isfinite(depth)] = 0.0
    normal = camera.matrix.T.astype(_F) @ centre.normal  # world -> camera frame
    rgb = np.round(np.clip(color, 0.0, 1.0) * 255.0).astype(np.uint8)
    return SyntheticScene(
        rgb=np.ascontiguousarray(rgb.T.reshape(h, w, 3)),
        depth=depth.reshape(h, w),
        normal=np.ascontiguousarray(normal.T.reshape(h, w, 3)),
        alpha=alpha.reshape(h, w),
    )


# --------------------------------------------------------------------------------------------
# Random scenes
# --------------------------------------------------------------------------------------------


def _random_material(rng: np.random.Generator, pale: bool, period: tuple[float, float]) -> Material:
    lo, hi = (0.35, 0.95) if pale else (0.1, 1.0)
    color = rng.uniform(lo, hi, 3)
    draw = rng.random(4)
    pattern = "solid" if draw[0] < 0.4 else "checker" if draw[0] < 0.7 else "stripes"
    if draw[1] < 0.5:  # a darker shade of the same colour, else an unrelated colour
        color2 = color * (0.3 + 0.4 * draw[2])
    else:
        color2 = rng.uniform(0.05, 0.95, 3)
    return Material(
        color=tuple(color.tolist()),
        pattern=pattern,
        color2=tuple(color2.tolist()),
        period=float(period[0] + (period[1] - period[0]) * draw[3]),
        angle=float(rng.choice((0.0, 90.0, 45.0, 135.0))),
    )


def _room(rng: np.random.Generator, tan_x: float) -> tuple[list[Plane], float]:
    """Back wall, floor (first two) and optional side walls / ceiling, turned about the vertical.

    Returns the planes and the distance of the back wall.
    """
    distance = rng.uniform(3.5, 10.0)
    eye_height = rng.uniform(1.0, 1.8)
    turn = rotation_matrix(yaw=rng.uniform(-15.0, 15.0))
    wall_period = (0.06 * distance, 0.15 * distance)
    room = [
        Plane(turn @ (0.0, 0.0, -distance), turn @ (0.0, 0.0, 1.0), _random_material(rng, True, wall_period)),
        Plane((0.0, -eye_height, 0.0), (0.0, 1.0, 0.0), _random_material(rng, False, (0.3, 1.0))),
    ]
    for side in (-1.0, 1.0):
        if rng.random() < 0.6:
            offset = rng.uniform(0.4, 1.2) * distance * tan_x
            material = _random_material(rng, True, wall_period)
            room.append(Plane(turn @ (side * offset, 0.0, 0.0), turn @ (-side, 0.0, 0.0), material))
    if rng.random() < 0.5:
        height = rng.uniform(0.8, 1.6)
        room.append(Plane((0.0, height, 0.0), (0.0, -1.0, 0.0), _random_material(rng, True, (0.5, 1.5))))
    return room, distance


def _random_object(
    rng: np.random.Generator,
    room: list[Plane],
    distance: float,
    camera_rotation: np.ndarray,
    tan_x: float,
    tan_y: float,
    attempts: int = 30,
) -> Surface | None:
    """One sphere, box or card inside the room and in view, or None if none was placed."""
    normals = np.stack([_unit(p.normal) for p in room])
    offsets = np.einsum("ij,ij->i", normals, np.stack([_vec(p.point) for p in room]))
    floor_y = _vec(room[1].point)[1]
    for _ in range(attempts):
        draw = rng.random(3)
        kind = "sphere" if draw[0] < 0.4 else "box" if draw[0] < 0.8 else "card"
        on_floor = draw[1] < 0.5
        z = rng.uniform(1.0, 0.9 * distance)
        sx, sy = rng.uniform(-0.7, 0.7, 2)
        center = camera_rotation @ np.array([sx * tan_x * z, sy * tan_y * z, -z])
        size = z * tan_x * rng.uniform(0.12, 0.35)  # 12-35 % of the half-width of the view
        if kind == "sphere":
            half, lift, bound = None, size, size
        else:
            half = size * rng.uniform(0.5 if kind == "box" else 0.6, 1.0, 3 if kind == "box" else 2)
            lift, bound = half[1], float(np.linalg.norm(half))
        if on_floor:
            center[1] = floor_y + lift

        # Inside the room (resting on the floor is fine), clear of the camera, centre in view.
        clearance = normals @ center - offsets - bound
        if on_floor:
            clearance[1] = np.inf
        view = center @ camera_rotation  # camera frame
        depth = -view[2]
        if (
            clearance.min() < 0.02
            or depth < bound + 0.5
            or abs(view[0]) > 0.9 * tan_x * depth
            or abs(view[1]) > 0.9 * tan_y * depth
        ):
            continue

        material = _random_material(rng, False, (0.25 * size, 0.8 * size))
        if kind == "sphere":
            return Sphere(tuple(center), float(size), material)
        if kind == "box":
            if on_floor:  # standing on the floor, turned about the vertical
                rotation = rotation_matrix(yaw=rng.uniform(0.0, 90.0))
            elif rng.random() < 0.3:  # axis-aligned
                rotation = None
            else:
                rotation = rotation_matrix(*rng.uniform(0.0, 360.0, 3))
            return Box(tuple(center), tuple(half), rotation, material)
        if on_floor:  # upright, turned about the vertical
            rotation = rotation_matrix(yaw=rng.uniform(-50.0, 50.0))
        else:  # roughly facing the camera
            rotation = camera_rotation @ rotation_matrix(*rng.uniform(-40.0, 40.0, 3))
        return Rect(tuple(center), tuple(half), rotation, material)
    return None


def sample_scene(
    seed: SeedLike,
    height: int = 64,
    width: int = 64,
    *,
    hfov_deg: float = 60.0,
    focal: float | None = None,
    num_objects: int | None = None,
) -> SceneDescription:
    """Draw a random room with ``num_objects`` (default: 1-4 at random) foreground objects.

    The scene depends on the seed, the field of view and the aspect ratio only, so the same seed
    at 64x64 and 256x256 gives the same scene.
    """
    rng = np.random.default_rng(seed)
    camera_rotation = rotation_matrix(pitch=rng.uniform(-12.0, 4.0), roll=rng.uniform(-4.0, 4.0))
    if focal is None:
        camera = Camera.from_fov(width, height, hfov_deg, camera_rotation)
    else:
        camera = Camera(width, height, float(focal), camera_rotation)
    tan_x, tan_y = width / 2 / camera.focal, height / 2 / camera.focal

    room, distance = _room(rng, tan_x)
    count = int(rng.integers(1, 5)) if num_objects is None else num_objects
    objects = []
    for _ in range(count):
        obj = _random_object(rng, room, distance, camera_rotation, tan_x, tan_y)
        if obj is not None:
            objects.append(obj)
    if not objects and count > 0:  # rare: fall back to a small sphere straight ahead
        centre = camera_rotation @ np.array([0.0, 0.0, -1.5])
        objects.append(Sphere(tuple(centre), 0.2, _random_material(rng, False, (0.05, 0.15))))

    light = np.array([rng.uniform(-0.8, 0.8), rng.uniform(0.4, 1.0), rng.uniform(0.2, 1.0)])
    ambient = float(rng.uniform(0.2, 0.45))
    return SceneDescription(camera, room + objects, tuple(_unit(light).tolist()), ambient)


def _invalid_mask(rng: np.random.Generator, height: int, width: int, fraction: float) -> np.ndarray:
    """Random rectangles ("missing depth") covering between ``fraction`` and twice that."""
    mask = np.zeros((height, width), dtype=bool)
    side = math.sqrt(fraction)  # no rectangle is larger than ``fraction`` of the image
    for _ in range(256):
        if mask.mean() >= fraction:
            break
        h = max(1, round(height * side * rng.uniform(0.5, 1.0)))
        w = max(1, round(width * side * rng.uniform(0.5, 1.0)))
        top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        mask[top : top + h, left : left + w] = True
    return mask


def render_scene(
    seed: SeedLike,
    height: int = 64,
    width: int = 64,
    *,
    hfov_deg: float = 60.0,
    focal: float | None = None,
    num_objects: int | None = None,
    supersample: int = 3,
    invalid_fraction: float = 0.0,
) -> SyntheticScene:
    """Render the random scene of ``seed`` (any ``numpy.random.default_rng`` seed).

    ``invalid_fraction`` > 0 blanks rectangles covering about that fraction of the image in depth
    and normal (0 and the zero vector, as missing sensor data), leaving RGB and alpha intact, so
    that loaders' validity masks are exercised. Changing it does not change the scene.
    """
    if not 0.0 <= invalid_fraction < 1.0:
        raise ValueError(f"invalid_fraction must be in [0, 1), got {invalid_fraction}")
    rng = np.random.default_rng(seed)
    description = sample_scene(rng, height, width, hfov_deg=hfov_deg, focal=focal, num_objects=num_objects)
    scene = render(description, supersample=supersample)
    if invalid_fraction > 0:
        invalid = _invalid_mask(rng, height, width, invalid_fraction)
        scene.depth[invalid] = 0.0
        scene.normal[invalid] = 0.0
    return scene


# --------------------------------------------------------------------------------------------
# Writing a training folder
# --------------------------------------------------------------------------------------------


def scene_seed(dataset_seed: int, index: int) -> int:
    """The seed of scene ``index`` in the dataset of ``dataset_seed``.

    Hashed (not ``dataset_seed + index``) so datasets with nearby seeds share no scenes: a
    training set of seed 0 and a held-out set of seed 1 are disjoint.
    """
    return int(np.random.SeedSequence([dataset_seed, index]).generate_state(1, np.uint64)[0])


def _save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(array).save(path)


def write_synthetic_dataset(
    root: str | Path,
    num_scenes: int,
    height: int = 64,
    width: int = 64,
    seed: int = 0,
    tasks: Iterable[str] = TASKS,
    show_progress: bool = False,
    **options,
) -> Path:
    """Write ``num_scenes`` scenes in the plain training-folder format and return ``root``.

    Layout: ``rgb/scene_00000.png`` (8-bit RGB) plus, per requested task,
    ``depth/scene_00000.npy`` (float32 HxW metres, 0 = invalid),
    ``normal/scene_00000.npy`` (float32 HxWx3, camera frame, 0-vector = invalid) and
    ``alpha/scene_00000.png`` (16-bit grayscale, alpha * 65535), and ``d3_dataset.json``, written
    last. Its ``min_depth`` / ``max_depth`` strictly enclose every valid depth in the folder, so a
    ``min_depth < d < max_depth`` mask keeps them all. Scene i is
    ``render_scene(scene_seed(seed, i), height, width, **options)``; ``options`` are
    :func:`render_scene`'s keyword arguments.
    """
    tasks = tuple(tasks)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; expected a subset of {TASKS}")
    if num_scenes < 1:
        raise ValueError(f"num_scenes must be >= 1, got {num_scenes}")
    root = Path(root)
    for folder in ("rgb",) + tasks:
        (root / folder).mkdir(parents=True, exist_ok=True)

    indices: Iterable[int] = range(num_scenes)
    if show_progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="synthetic scenes", unit="scene")
    lowest, highest = math.inf, 0.0
    for i in indices:
        scene = render_scene(scene_seed(seed, i), height, width, **options)
        name = f"scene_{i:05d}"
        _save_png(root / "rgb" / f"{name}.png", scene.rgb)
        if "depth" in tasks:
            np.save(root / "depth" / f"{name}.npy", scene.depth)
        if "normal" in tasks:
            np.save(root / "normal" / f"{name}.npy", scene.normal)
        if "alpha" in tasks:
            _save_png(root / "alpha" / f"{name}.png", np.round(scene.alpha * 65535).astype(np.uint16))
        valid = scene.depth[scene.depth > 0]
        if valid.size:
            lowest, highest = min(lowest, float(valid.min())), max(highest, float(valid.max()))

    if not math.isfinite(lowest):  # no valid depth at all
        lowest, highest = 1.0, 1.0
    meta = {
        "source": "synthetic",
        "depth_kind": "metric",
        "min_depth": math.floor(lowest * 0.99 * 1000) / 1000,
        "max_depth": math.ceil(highest * 1.01 * 1000) / 1000,
        "num_samples": num_scenes,
    }
    (root / "d3_dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return root


def main(argv: Sequence[str] | None = None) -> Path:
    from d3 import flags

    parser = flags.ArgumentParser(
        prog="python -m d3.data.synthetic",
        description="Write procedural scenes (RGB, depth, normals, alpha) as a plain training folder.",
    )
    parser.add_argument("--output", required=True, help="folder to write (created if missing)")
    parser.add_argument("--num_scenes", type=int, required=True, help="how many scenes (one sample each)")
    parser.add_argument("--height", type=int, default=64, help="image height in pixels")
    parser.add_argument("--width", type=int, default=64, help="image width in pixels")
    parser.add_argument("--seed", type=int, default=0, help="the scenes depend on it only")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="ground truths to write")
    parser.add_argument("--hfov_deg", type=float, default=60.0, help="horizontal field of view")
    parser.add_argument("--supersample", type=int, default=3, help="sub-pixel rays per axis on edges")
    parser.add_argument("--invalid_fraction", type=float, default=0.0, help="blank this much depth")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")

    def validate(args) -> None:
        for flag in ("--num_scenes", "--height", "--width", "--supersample"):
            flags.at_least(flag, getattr(args, flag[2:]), 1)
        flags.between("--hfov_deg", args.hfov_deg, 1, 179)
        flags.between("--invalid_fraction", args.invalid_fraction, 0, 1)

    args = flags.parse_checked(parser, validate, argv)
    root = write_synthetic_dataset(
        args.output,
        args.num_scenes,
        args.height,
        args.width,
        seed=args.seed,
        tasks=args.tasks,
        show_progress=not args.quiet,
        hfov_deg=args.hfov_deg,
        supersample=args.supersample,
        invalid_fraction=args.invalid_fraction,
    )
    print(f"Wrote {args.num_scenes} scenes to {root}")
    return root


if __name__ == "__main__":
    main()
