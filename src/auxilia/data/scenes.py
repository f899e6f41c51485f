"""Procedurally rendered indoor scenes with exact segmentation, depth and surface normals.

A stand-in for NYUv2-style dense prediction (segmentation primary, depth and normals auxiliary)
that needs no download and renders a thousand 64 x 64 scenes in a second or two on a CPU.

Each scene is ray cast through a pinhole camera standing on a floor and looking (pitched down,
slightly rolled) at a wall, with boxes and spheres resting on the floor:

============ ===== ========================================================================
class        index texture
============ ===== ========================================================================
``floor``    0     checkerboard in world coordinates (tile size varies per scene)
``wall``     1     running-bond bricks with dark mortar
``box``      2     flat colour with a dark band along every face's border; any yaw
``sphere``   3     six alternating longitude segments (a beach ball); any spin
============ ===== ========================================================================

Colours are random per surface, so classes must be told apart by shape and texture. Shading is
Lambertian with one directional light and an ambient term, ``albedo * (a + (1 - a) * max(0, n.l))``,
so the image itself carries the normals. Labels are exact for the ray through each pixel's centre:

* ``segmentation`` (N, H, W) int64, indices into :data:`CLASSES`;
* ``depth`` (N, 1, H, W) float, the z-depth in metres (distance along the optical axis), > 0;
* ``normals`` (N, 3, H, W) float, unit vectors in the camera frame (x right, y down, z forward),
  facing the camera.

Scene ``i`` of seed ``s`` depends on ``(s, i)`` only: ``generate_scenes(n, seed, start=k)`` gives
scenes ``k .. k + n - 1`` whatever the batch, so disjoint splits are disjoint index ranges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

CLASSES = ["floor", "wall", "box", "sphere"]
FLOOR, WALL, BOX, SPHERE = range(4)
_UNIFORMS_PER_SCENE = 96  # fixed, so scene i's parameters never depend on other settings
_BOX_BASE, _BOX_STRIDE, _SPHERE_STRIDE = 16, 10, 8
_INF = float("inf")


@dataclass
class Scenes:
    """Rendered scenes and their exact labels; ``layout`` holds every scene parameter in the camera
    frame (see :func:`generate_scenes`)."""

    images: Tensor  # (N, 3, H, W) float in [0, 1]
    segmentation: Tensor  # (N, H, W) int64
    depth: Tensor  # (N, 1, H, W) float, metres
    normals: Tensor  # (N, 3, H, W) float, unit, camera frame
    focal: float  # pixels; the principal point is the image centre
    layout: dict[str, Tensor] = field(default_factory=dict)
    instances: Tensor | None = None  # (N, H, W) int64: 0 floor, 1 wall, 2 + k box k, 2 + K + s sphere s

    def __len__(self) -> int:
        return len(self.images)

    def targets(self) -> dict[str, Tensor]:
        return {"segmentation": self.segmentation, "depth": self.depth, "normals": self.normals}

    def dataset(self):
        """A ``TaskDataset`` of all scenes: images in, ``segmentation``, ``depth`` and ``normals`` out."""
        from ..training.data import TaskDataset

        return TaskDataset(self.images, self.targets())


def _camera_rays(height: int, width: int, focal: float) -> Tensor:
    """Unit ray directions (H * W, 3) through the pixel centres, camera frame."""
    v, u = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                          indexing="ij")
    rays = torch.stack([(u + 0.5 - width / 2) / focal, (v + 0.5 - height / 2) / focal, torch.ones_like(u)], -1)
    return F.normalize(rays.reshape(-1, 3), dim=-1)


def _uniforms(seed: int, start: int, n: int) -> Tensor:
    rows = [np.random.default_rng([seed, start + i]).random(_UNIFORMS_PER_SCENE) for i in range(n)]
    return torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, _UNIFORMS_PER_SCENE, dtype=torch.float64)


def _lerp(u: Tensor, low: float, high: float) -> Tensor:
    return low + (high - low) * u


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1)


def _apply(matrix: Tensor, vector: Tensor) -> Tensor:
    """``matrix @ vector`` over broadcast leading dimensions, (..., 3, 3) and (..., 3), written out
    elementwise so that every scene's numbers are the same whatever the batch."""
    return (matrix * vector[..., None, :]).sum(-1)


def _layout(u: Tensor, max_boxes: int, max_spheres: int, tan_half: float) -> dict[str, Tensor]:
    """World-frame scene parameters from (N, 96) uniforms. World: x right, y up, z ahead; the
    floor is y = 0 and the camera stands at (0, h, 0)."""
    n = len(u)
    deg = math.pi / 180
    L: dict[str, Tensor] = {}
    L["height"] = _lerp(u[:, 0], 1.2, 1.8)
    pitch, roll = _lerp(u[:, 1], 8, 22) * deg, _lerp(u[:, 2], -6, 6) * deg
    forward = torch.stack([torch.zeros_like(pitch), -torch.sin(pitch), torch.cos(pitch)], -1)
    down = torch.stack([torch.zeros_like(pitch), -torch.cos(pitch), -torch.sin(pitch)], -1)
    right = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64).expand(n, 3)
    cr, sr = torch.cos(roll)[:, None], torch.sin(roll)[:, None]
    L["rotation"] = torch.stack([cr * right + sr * down, -sr * right + cr * down, forward], -1)  # columns: camera axes
    yaw = _lerp(u[:, 3], -25, 25) * deg
    L["wall_direction"] = torch.stack([torch.sin(yaw), torch.zeros(n, dtype=yaw.dtype), torch.cos(yaw)], -1)
    azimuth, elevation = _lerp(u[:, 5], -70, 70) * deg, _lerp(u[:, 6], 30, 75) * deg
    L["light"] = torch.stack([torch.sin(azimuth) * torch.cos(elevation), torch.sin(elevation),
                              -torch.cos(azimuth) * torch.cos(elevation)], -1)
    L["ambient"] = _lerp(u[:, 7], 0.15, 0.35)
    L["floor_colour"], L["floor_tile"] = _lerp(u[:, 8:11], 0.25, 0.9), _lerp(u[:, 11], 0.4, 0.8)
    L["wall_colour"], L["brick_height"] = _lerp(u[:, 12:15], 0.25, 0.9), _lerp(u[:, 15], 0.2, 0.35)

    b = u[:, _BOX_BASE : _BOX_BASE + _BOX_STRIDE * max_boxes].reshape(n, max_boxes, _BOX_STRIDE)
    box_z = _lerp(b[..., 2], 2.2, 5.5)
    box_half = torch.stack([_lerp(b[..., 3], 0.25, 0.55), _lerp(b[..., 4], 0.2, 0.6), _lerp(b[..., 5], 0.25, 0.55)], -1)
    box_x = (2 * b[..., 1] - 1) * 0.8 * box_z * tan_half
    L["box_present"] = b[..., 0] < 0.7
    L["box_present"][:, :1] = True  # every scene has at least one object
    L["box_center"] = torch.stack([box_x, box_half[..., 1], box_z], -1)
    L["box_half"], L["box_yaw"] = box_half, b[..., 6] * (math.pi / 2)
    L["box_colour"] = _lerp(b[..., 7:10], 0.2, 0.95)

    base = _BOX_BASE + _BOX_STRIDE * 4
    s = u[:, base : base + _SPHERE_STRIDE * max_spheres].reshape(n, max_spheres, _SPHERE_STRIDE)
    sphere_z, radius = _lerp(s[..., 2], 2.2, 5.5), _lerp(s[..., 3], 0.25, 0.55)
    L["sphere_present"] = s[..., 0] < 0.7
    L["sphere_center"] = torch.stack([(2 * s[..., 1] - 1) * 0.8 * sphere_z * tan_half, radius, sphere_z], -1)
    L["sphere_radius"], L["sphere_spin"] = radius, s[..., 4] * (2 * math.pi)
    L["sphere_colour"] = _lerp(s[..., 5:8], 0.2, 0.95)

    # the wall stands behind every object
    m = L["wall_direction"]
    reach = torch.cat([
        torch.where(L["box_present"], _dot(L["box_center"], m[:, None]) + box_half[..., [0, 2]].norm(dim=-1), -_INF),
        torch.where(L["sphere_present"], _dot(L["sphere_center"], m[:, None]) + radius, -_INF),
    ], 1).amax(1)
    L["wall_distance"] = torch.maximum(_lerp(u[:, 4], 6.0, 9.0), reach + 0.3)
    return L


def _box_axes(yaw: Tensor) -> Tensor:
    """(..., 3, 3): rows are a box's local x, y, z axes in world coordinates."""
    c, s, z, o = torch.cos(yaw), torch.sin(yaw), torch.zeros_like(yaw), torch.ones_like(yaw)
    return torch.stack([torch.stack([c, z, s], -1), torch.stack([z, o, z], -1), torch.stack([-s, z, c], -1)], -2)


def _render(L: dict[str, Tensor], rays: Tensor, dtype: torch.dtype, shading: bool = True) -> tuple[Tensor, ...]:
    """Ray cast a chunk of scenes. Returns images (B, P, 3), classes (B, P), surfaces (B, P),
    depth (B, P), camera normals (B, P, 3)."""
    L = {k: v if v.dtype == torch.bool else v.to(dtype) for k, v in L.items()}
    R, rays = L["rotation"], rays.to(dtype)
    B, P = len(R), len(rays)
    d = _apply(R[:, None], rays[None])  # world ray directions (B, P, 3)
    h = L["height"]
    origin = torch.zeros(B, 3, dtype=dtype)
    origin[:, 1] = h
    K, S = L["box_present"].shape[1], L["sphere_present"].shape[1]

    # floor (y = 0) first, then every closer surface replaces it
    dy = d[..., 1]
    t = torch.where(dy < -1e-9, h[:, None] / -dy.clamp(max=-1e-9), _INF)
    surface = torch.zeros(B, P, dtype=torch.long)

    def closer(candidate: Tensor, index: int) -> None:
        nonlocal t, surface
        better = candidate < t
        t = torch.where(better, candidate, t)
        surface = torch.where(better, index, surface)

    m = L["wall_direction"]
    facing = _dot(d, m[:, None])
    closer(torch.where(facing > 1e-9, L["wall_distance"][:, None] / facing.clamp(min=1e-9), _INF), 1)

    axes = _box_axes(L["box_yaw"])  # (B, K, 3, 3)
    half = L["box_half"]
    o_local = _apply(axes, origin[:, None] - L["box_center"])  # (B, K, 3)
    faces = []
    for k in range(K):  # slab test in the box's frame
        d_local = _apply(axes[:, k, None], d)
        d_local = torch.where(d_local.abs() < 1e-12, 1e-12, d_local)
        t1 = (-half[:, k, None] - o_local[:, k, None]) / d_local
        t2 = (half[:, k, None] - o_local[:, k, None]) / d_local
        t_in, face = torch.minimum(t1, t2).max(-1)
        hit = (t_in <= torch.maximum(t1, t2).amin(-1)) & (t_in > 1e-6) & L["box_present"][:, k, None]
        closer(torch.where(hit, t_in, _INF), 2 + k)
        faces.append((face, torch.gather(d_local, -1, face[..., None])))

    center, radius = L["sphere_center"], L["sphere_radius"]
    for s in range(S):
        oc = origin - center[:, s]  # (B, 3)
        b = _dot(d, oc[:, None])
        disc = b**2 - (_dot(oc, oc) - radius[:, s] ** 2)[:, None]
        t_sphere = -b - disc.clamp(min=0).sqrt()
        hit = (disc >= 0) & (t_sphere > 1e-6) & L["sphere_present"][:, s, None]
        closer(torch.where(hit, t_sphere, _INF), 2 + K + s)

    if not torch.isfinite(t).all():
        raise RuntimeError("a camera ray hit no surface; the scene layout is out of its valid range")
    point = origin[:, None] + t[..., None] * d
    normal = torch.zeros(B, P, 3, dtype=dtype)
    normal[..., 1] = 1.0
    normal = torch.where((surface == 1)[..., None], -m[:, None], normal)
    for k, (face, d_face) in enumerate(faces):
        row = torch.gather(axes[:, k], 1, face[..., None].expand(-1, -1, 3))  # (B, P, 3): the entry face's axis
        normal = torch.where((surface == 2 + k)[..., None], -torch.sign(d_face) * row, normal)
    for s in range(S):
        outward = (point - center[:, s, None]) / radius[:, s, None, None]
        normal = torch.where((surface == 2 + K + s)[..., None], outward, normal)
    normal = normal / _dot(normal, normal).sqrt()[..., None]
    classes = torch.tensor([FLOOR, WALL] + [BOX] * K + [SPHERE] * S)[surface]

    image = _albedo(L, point, surface, K, S)
    if shading:
        ambient = L["ambient"][:, None, None]
        image = image * (ambient + (1 - ambient) * _dot(normal, L["light"][:, None]).clamp(min=0)[..., None])
    image = image.clamp(0, 1)
    depth = t * rays[:, 2]
    camera_normal = _apply(R.transpose(1, 2)[:, None], normal)
    return image, classes, surface, depth, camera_normal


def _albedo(L: dict[str, Tensor], p: Tensor, surface: Tensor, K: int, S: int) -> Tensor:
    """Per-pixel surface colour: each class's texture evaluated on the pixels showing it."""
    albedo = torch.empty(*surface.shape, 3, dtype=p.dtype)

    def paint(index: int, colour: Tensor, texture) -> None:
        scene, pixel = torch.nonzero(surface == index, as_tuple=True)
        if len(scene):
            albedo[scene, pixel] = colour[scene] * texture(scene, p[scene, pixel])[:, None]

    def checker(scene: Tensor, q: Tensor) -> Tensor:
        tile = L["floor_tile"][scene]
        return 1 - 0.4 * (torch.floor(q[:, 0] / tile) + torch.floor(q[:, 2] / tile)).remainder(2)

    def bricks(scene: Tensor, q: Tensor) -> Tensor:
        m, brick = L["wall_direction"][scene], L["brick_height"][scene]
        along = q[:, 0] * m[:, 2] - q[:, 2] * m[:, 0]  # horizontal coordinate on the wall
        row = torch.floor(q[:, 1] / brick)
        across = (along / (2 * brick) + 0.5 * row.remainder(2)).remainder(1)
        mortar = ((q[:, 1] / brick).remainder(1) < 0.1) | (across < 0.05)
        return 1 - 0.55 * mortar.to(q.dtype)

    def bordered(k: int):
        def texture(scene: Tensor, q: Tensor) -> Tensor:
            local = _apply(_box_axes(L["box_yaw"][scene, k]), q - L["box_center"][scene, k])
            r = (local.abs() / L["box_half"][scene, k]).clamp(max=1)
            second = r.sum(-1) - r.amax(-1) - r.amin(-1)  # the larger in-face coordinate
            return 1 - 0.6 * (second > 0.85).to(q.dtype)
        return texture

    def segments(s: int):
        def texture(scene: Tensor, q: Tensor) -> Tensor:
            rel = q - L["sphere_center"][scene, s]
            angle = torch.atan2(rel[:, 2], rel[:, 0]) + L["sphere_spin"][scene, s]
            return 1 - 0.55 * torch.floor(angle / (math.pi / 3)).remainder(2)
        return texture

    paint(0, L["floor_colour"], checker)
    paint(1, L["wall_colour"], bricks)
    for k in range(K):
        paint(2 + k, L["box_colour"][:, k], bordered(k))
    for s in range(S):
        paint(2 + K + s, L["sphere_colour"][:, s], segments(s))
    return albedo


def generate_scenes(
    n: int,
    seed: int = 0,
    size: int | tuple[int, int] = 64,
    start: int = 0,
    max_boxes: int = 2,
    max_spheres: int = 2,
    fov: float = 60.0,
    noise: float = 0.0,
    shading: bool = True,
    chunk: int = 128,
    dtype: torch.dtype = torch.float32,
) -> Scenes:
    """Render scenes ``start .. start + n - 1`` of ``seed`` at ``size`` (an int for square images or
    ``(height, width)``).

    ``fov`` is the horizontal field of view in degrees; ``noise`` the standard deviation of
    Gaussian pixel noise added to the images (labels stay exact). ``shading=False`` renders the
    bare albedo (textures without lighting). Up to ``max_boxes`` (1..4) boxes,
    at least one present, and up to ``max_spheres`` (0..4) spheres per scene. Rendering runs in
    ``chunk``-scene batches in ``dtype`` (float32 is exact to about 1e-6 relative).

    ``layout`` (camera frame: x right, y down, z forward, origin at the camera): ``up`` (N, 3) the
    floor normal, ``height`` (N,) the camera's height above the floor, ``wall_normal`` (N, 3) and
    ``wall_distance`` (N,), ``light`` (N, 3) towards the light, ``ambient`` (N,), ``box_center`` (N, K, 3),
    ``box_half`` (N, K, 3) half sizes, ``box_axes`` (N, K, 3, 3) rows the box axes,
    ``box_present`` (N, K), ``sphere_center`` (N, S, 3), ``sphere_radius`` (N, S) and
    ``sphere_present`` (N, S).
    """
    height, width = (size, size) if isinstance(size, int) else size
    if n < 0 or height < 1 or width < 1:
        raise ValueError(f"need n >= 0 and a positive size, got n={n}, size={size}")
    if not 1 <= max_boxes <= 4 or not 0 <= max_spheres <= 4:
        raise ValueError(f"max_boxes must be in 1..4 and max_spheres in 0..4, got {max_boxes}, {max_spheres}")
    if not 10 <= fov <= 80:
        raise ValueError(f"fov must be between 10 and 80 degrees (every ray must meet the floor or wall), got {fov}")
    tan_half = math.tan(math.radians(fov) / 2)
    focal = (width / 2) / tan_half
    rays = _camera_rays(height, width, focal)
    u = _uniforms(seed, start, n)
    L = _layout(u, max_boxes, max_spheres, tan_half)

    images = torch.empty(n, 3, height, width, dtype=dtype)
    segmentation = torch.empty(n, height, width, dtype=torch.long)
    instances = torch.empty(n, height, width, dtype=torch.long)
    depth = torch.empty(n, 1, height, width, dtype=dtype)
    normals = torch.empty(n, 3, height, width, dtype=dtype)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        part = {k: v[lo:hi] for k, v in L.items()}
        image, classes, surface, z, normal = _render(part, rays, dtype, shading)
        instances[lo:hi] = surface.reshape(-1, height, width)
        images[lo:hi] = image.transpose(1, 2).reshape(-1, 3, height, width).to(dtype)
        segmentation[lo:hi] = classes.reshape(-1, height, width)
        depth[lo:hi] = z.reshape(-1, 1, height, width).to(dtype)
        normals[lo:hi] = normal.transpose(1, 2).reshape(-1, 3, height, width).to(dtype)
    if noise > 0:
        for i in range(n):
            rng = np.random.default_rng([seed, start + i, 1])
            images[i] += torch.from_numpy(rng.standard_normal((3, height, width))).to(dtype) * noise
        images.clamp_(0, 1)
    return Scenes(images, segmentation, depth, normals, focal, _camera_layout(L, dtype), instances)


def _camera_layout(L: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    R = L["rotation"]  # world = R @ camera

    def direction(v: Tensor) -> Tensor:  # world direction(s) -> camera frame
        shape = (len(R),) + (1,) * (v.dim() - 2) + (3, 3)
        return _apply(R.transpose(1, 2).reshape(shape), v)

    origin = torch.zeros_like(L["box_center"][:, 0])
    origin[:, 1] = L["height"]
    out = {
        "up": direction(torch.tensor([0.0, 1.0, 0.0], dtype=R.dtype).expand(len(R), 3)),
        "height": L["height"],
        "wall_normal": direction(-L["wall_direction"]),
        "wall_distance": L["wall_distance"],
        "light": direction(L["light"]),
        "ambient": L["ambient"],
        "box_center": direction(L["box_center"] - origin[:, None]),
        "box_half": L["box_half"],
        "box_axes": direction(_box_axes(L["box_yaw"])),
        "box_present": L["box_present"],
        "sphere_center": direction(L["sphere_center"] - origin[:, None]),
        "sphere_radius": L["sphere_radius"],
        "sphere_present": L["sphere_present"],
    }
    return {k: v if v.dtype == torch.bool else v.to(dtype) for k, v in out.items()}


def backproject(depth: Tensor, focal: float) -> Tensor:
    """Camera-frame points (N, 3, H, W) of a z-depth map (N, 1, H, W); principal point at the centre."""
    _, _, height, width = depth.shape
    v, u = torch.meshgrid(torch.arange(height, dtype=depth.dtype, device=depth.device),
                          torch.arange(width, dtype=depth.dtype, device=depth.device), indexing="ij")
    rays = torch.stack([(u + 0.5 - width / 2) / focal, (v + 0.5 - height / 2) / focal, torch.ones_like(u)])
    return depth * rays


def normals_from_depth(depth: Tensor, focal: float) -> Tensor:
    """Surface normals (N, 3, H, W) estimated from a z-depth map by central differences of the
    back-projected points, facing the camera. Exact on planes away from edges; border pixels use
    one-sided differences."""
    points = F.pad(backproject(depth, focal), (1, 1, 1, 1), mode="replicate")
    du = points[..., 1:-1, 2:] - points[..., 1:-1, :-2]
    dv = points[..., 2:, 1:-1] - points[..., :-2, 1:-1]
    normal = F.normalize(torch.linalg.cross(du, dv, dim=1), dim=1)
    centre = points[..., 1:-1, 1:-1]
    return torch.where((normal * centre).sum(1, keepdim=True) > 0, -normal, normal)


def load_scenes(
    sizes: dict[str, int] | None = None, seed: int = 0, size: int | tuple[int, int] = 64, **options
) -> dict:
    """``TaskDataset`` splits of disjoint scenes (split ``k`` renders the index range after split
    ``k - 1``'s); default sizes 2,000 train, 100 aux, 300 val, 500 test. ``options`` go to
    :func:`generate_scenes`."""
    sizes = sizes or {"train": 2000, "aux": 100, "val": 300, "test": 500}
    out, start = {}, 0
    for name, count in sizes.items():
        out[name] = generate_scenes(count, seed=seed, size=size, start=start, **options).dataset()
        start += count
    return out
