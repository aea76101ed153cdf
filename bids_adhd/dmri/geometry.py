"""Rigid-body geometry shared by motion correction, template registration and the simulator:
Euler angles, the rotation factor of a 4×4 (polar decomposition), rotation angles.

Convention everywhere: ``R = Rz(rz) @ Ry(ry) @ Rx(rx)``, right-handed angles in radians about the
x, y, z axes (applied to a column vector, the x rotation acts first).
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["euler_to_matrix", "matrix_to_euler", "polar_rotation", "rotation_angle_deg"]


def euler_to_matrix(rx: float, ry: float, rz: float) -> np.ndarray:
    """``Rz(rz) @ Ry(ry) @ Rx(rx)`` (scalar angles in radians)."""
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    Rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return Rz @ Ry @ Rx


def matrix_to_euler(R) -> np.ndarray:
    """Inverse of :func:`euler_to_matrix`: ``(rx, ry, rz)`` in radians."""
    R = np.asarray(R, float)
    ry = -np.arcsin(np.clip(R[2, 0], -1.0, 1.0))
    rx = np.arctan2(R[2, 1], R[2, 2])
    rz = np.arctan2(R[1, 0], R[0, 0])
    return np.array([rx, ry, rz])


def polar_rotation(M) -> np.ndarray:
    """Rotation factor ``R`` of the polar decomposition ``M = R S`` of the 3×3 part of ``M``; a
    reflection (det < 0, which no head motion or registration can produce) is kept out of ``R``."""
    U, _, Vt = np.linalg.svd(np.asarray(M, float)[:3, :3])
    R = U @ Vt
    if np.linalg.det(R) < 0:
        U[:, -1] *= -1
        R = U @ Vt
    return R


def rotation_angle_deg(rot) -> float:
    """Angle (deg) of a 3×3 rotation (of the polar factor if it is not exactly orthogonal)."""
    r = np.asarray(rot, float)[:3, :3]
    u, _, vt = np.linalg.svd(r)
    r = u @ vt
    c = (np.trace(r) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))
