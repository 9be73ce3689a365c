"""Geometry helpers for maps and flat shapes.

* :func:`haversine_km` gives the great-circle distance between two points
  given by latitude and longitude, treating the Earth as a sphere.
* :func:`polygon_area` gives the area of a simple polygon in the plane with
  the shoelace formula.
"""

import math
from typing import NamedTuple, Sequence, Tuple

EARTH_RADIUS_KM = 6371.0088  # mean Earth radius


class LatLon(NamedTuple):
    """A point on the Earth's surface, in decimal degrees."""

    lat: float
    lon: float


def haversine_km(a: LatLon, b: LatLon, radius_km: float = EARTH_RADIUS_KM) -> float:
    """Return the great-circle distance between ``a`` and ``b`` in kilometres.

    The haversine formula is numerically stable for small distances. Because
    it assumes a spherical Earth, results can differ from the true distance
    on the ellipsoid by up to about 0.5 %.
    """
    lat1, lon1 = math.radians(a.lat), math.radians(a.lon)
    lat2, lon2 = math.radians(b.lat), math.radians(b.lon)
    dlat = lat2 - lat1
    dlon = lon2 - lon1
    h = math.sin(dlat / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin(dlon / 2) ** 2
    return 2 * radius_km * math.asin(min(1.0, math.sqrt(h)))


def signed_area(vertices: Sequence[Tuple[float, float]]) -> float:
    """Return the signed area of a polygon given by its vertices in order.

    The result is positive for counter-clockwise order and negative for
    clockwise order. The first vertex should not be repeated at the end.

    Raises:
        ValueError: if fewer than three vertices are given.
    """
    if len(vertices) < 3:
        raise ValueError("a polygon needs at least three vertices")
    total = 0.0
    for i, (x1, y1) in enumerate(vertices):
        x2, y2 = vertices[(i + 1) % len(vertices)]
        total += x1 * y2 - x2 * y1
    return total / 2.0


def polygon_area(vertices: Sequence[Tuple[float, float]]) -> float:
    """Return the (non-negative) area of a simple polygon.

    Uses the shoelace formula; the polygon must not intersect itself.
    """
    return abs(signed_area(vertices))


def is_counter_clockwise(vertices: Sequence[Tuple[float, float]]) -> bool:
    """Return True if the vertices are listed in counter-clockwise order."""
    return signed_area(vertices) > 0


if __name__ == "__main__":
    paris = LatLon(48.8566, 2.3522)
    berlin = LatLon(52.5200, 13.4050)
    print(f"Paris-Berlin: {haversine_km(paris, berlin):.0f} km")
    square = [(0, 0), (4, 0), (4, 4), (0, 4)]
    print("square area:", polygon_area(square))
    print("counter-clockwise:", is_counter_clockwise(square))
