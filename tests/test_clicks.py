"""The click simulator: where the next click goes, its sign, and the NoC metric."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from ibisagent.clicks import (
    ANCHOR_DEPTH,
    AnchorMode,
    Click,
    anchor_modes,
    click_anchor,
    distance_transform,
    error_regions,
    nearest_mode,
    next_click,
    number_of_clicks,
    padded_distance,
)


def test_first_click_is_the_centre_of_the_target_and_positive() -> None:
    target = np.zeros((50, 80), dtype=bool)
    target[10:31, 20:61] = True  # 21 rows x 41 cols, centre (x=40, y=20)
    click = next_click(target, np.zeros_like(target))
    assert click == Click(x=40, y=20, positive=True)


def test_negative_click_when_false_positive_peak_is_larger() -> None:
    target = np.zeros((60, 60), dtype=bool)
    target[5:10, 5:10] = True
    prediction = target.copy()
    prediction[30:55, 30:55] = True  # big false positive
    prediction[5, 5] = False  # tiny false negative
    click = next_click(target, prediction)
    assert click is not None and not click.positive
    assert 30 <= click.x < 55 and 30 <= click.y < 55


def test_area_rule_prefers_the_larger_region() -> None:
    target = np.zeros((40, 40), dtype=bool)
    target[0:2, :] = True  # thin, large-area false negative (peak distance 1-ish)
    prediction = np.zeros_like(target)
    prediction[20:26, 20:26] = True  # compact false positive (peak 3), smaller area
    assert next_click(target, prediction, rule="peak").positive is False
    assert next_click(target, prediction, rule="area").positive is True
    with pytest.raises(ValueError, match="rule"):
        next_click(target, prediction, rule="biggest")  # type: ignore[arg-type]


def test_image_border_counts_as_boundary() -> None:
    region = np.ones((5, 9), dtype=bool)
    dist = padded_distance(region)
    assert dist[0, 4] == 1.0 and dist[2, 4] == 3.0
    target = np.ones((5, 9), dtype=bool)
    assert next_click(target, np.zeros_like(target)) == Click(x=4, y=2, positive=True)


def test_never_the_same_pixel_twice_and_none_when_done() -> None:
    target = np.zeros((3, 3), dtype=bool)
    target[1, 1] = True
    empty = np.zeros_like(target)
    first = next_click(target, empty)
    assert first == Click(1, 1, True)
    assert next_click(target, empty, previous=[first]) is None
    assert next_click(target, target) is None


def test_error_regions_and_shape_checks() -> None:
    target = np.array([[1, 1, 0]], dtype=bool)
    pred = np.array([[0, 1, 1]], dtype=bool)
    fn, fp = error_regions(target, pred)
    assert fn.tolist() == [[True, False, False]] and fp.tolist() == [[False, False, True]]
    with pytest.raises(ValueError, match="shape"):
        error_regions(target, np.zeros((2, 3), dtype=bool))
    with pytest.raises(ValueError):
        Click(-1, 0, True)


def test_number_of_clicks() -> None:
    assert number_of_clicks([0.5, 0.86, 0.91], 0.85) == 2
    assert number_of_clicks([0.5, 0.86, 0.91], 0.90) == 3
    assert number_of_clicks([0.5], 0.9) is None


@settings(max_examples=150, deadline=None)
@given(arrays(bool, st.tuples(st.integers(1, 24), st.integers(1, 24))))
def test_bounding_box_distance_equals_the_whole_image_transform(region: np.ndarray) -> None:
    padded = np.pad(region, 1, mode="constant", constant_values=False)
    whole = ndimage.distance_transform_edt(padded)[1:-1, 1:-1]
    np.testing.assert_allclose(padded_distance(region), whole, rtol=1e-6)


def test_distance_transform_is_the_same_on_every_call() -> None:
    """OpenCV's float32 output varies in its last bit from call to call (seen on a 256 px mask); ours is the float32
    square root of the exact squared distance on every call, so a click's seed radius or a simulated click (ties
    included) never depends on the run."""
    rng = np.random.default_rng(0)
    inside = rng.random((256, 256)) > 0.02
    exact_squared = np.rint(ndimage.distance_transform_edt(inside) ** 2).astype(np.float32)
    for _ in range(20):
        np.testing.assert_array_equal(distance_transform(inside), np.sqrt(exact_squared))


def _ring(shape: tuple[int, int], centre: tuple[int, int], inner: float, outer: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    r = np.hypot(yy - centre[1], xx - centre[0])
    return (r >= inner) & (r < outer)


def test_an_anchored_click_goes_well_inside_the_target_where_the_anchor_is() -> None:
    # a thick-walled ring (a cortex-like ribbon): its deepest pixels run all around it
    ring = _ring((100, 100), (50, 50), 20, 34)
    empty = np.zeros_like(ring)
    dist = ndimage.distance_transform_edt(ring)
    for anchor in ((10.0, 50.0), (50.0, 95.0), (88.0, 12.0)):
        click = next_click(ring, empty, anchor=anchor)
        assert click is not None and click.positive and ring[click.y, click.x]
        assert dist[click.y, click.x] >= ANCHOR_DEPTH * dist.max()
        ys, xs = np.nonzero(dist >= ANCHOR_DEPTH * dist.max())
        nearest = np.hypot(xs - anchor[0], ys - anchor[1]).min()
        assert np.hypot(click.x - anchor[0], click.y - anchor[1]) == pytest.approx(nearest)
    # anchors on opposite sides give clicks on opposite sides; without one it is the deepest point
    left, right = next_click(ring, empty, anchor=(0.0, 50.0)), next_click(ring, empty, anchor=(99.0, 50.0))
    assert left is not None and right is not None and left.x < 30 < 70 < right.x
    plain = next_click(ring, empty)
    assert plain is not None and dist[plain.y, plain.x] == dist.max()


def test_an_anchored_refinement_click_stays_in_the_region_the_rule_chose() -> None:
    target = np.zeros((60, 60), dtype=bool)
    target[5:10, 5:10] = True
    prediction = target.copy()
    prediction[30:55, 30:55] = True  # the larger error: a false positive far from the anchor
    click = next_click(target, prediction, anchor=(0.0, 0.0))
    assert click is not None and not click.positive and prediction[click.y, click.x] and not target[click.y, click.x]
    # the false positive (25 x 25, peak depth 13) pixel nearest the anchor at half its peak depth: 7 px in
    assert (click.x, click.y) == (36, 36)


def test_click_anchor_is_where_the_masks_overlap_most() -> None:
    rng = np.random.default_rng(0)
    masks = []
    for _ in range(12):  # a blob that moves a little from image to image, at two image sizes
        size = int(rng.choice([80, 160]))
        cx, cy = (0.25 + rng.uniform(-0.05, 0.05)) * size, (0.7 + rng.uniform(-0.05, 0.05)) * size
        yy, xx = np.mgrid[:size, :size]
        masks.append(np.hypot(xx - cx, yy - cy) < 0.12 * size)
    masks.append(np.zeros((80, 80), dtype=bool))  # an absent target does not count
    anchor = click_anchor(masks)
    assert anchor is not None
    assert anchor[0] == pytest.approx(0.25, abs=0.05) and anchor[1] == pytest.approx(0.7, abs=0.05)
    assert click_anchor([np.zeros((10, 10), dtype=bool)]) is None


def _views(kind: str, n: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``n`` 100 x 100 (image, mask) pairs of one kind of view: an upper-left arc ("axial") or a lower-right bar
    ("coronal"), jittered a little; each kind has its own background, and the brightness varies."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:100, :100]
    images, masks = [], []
    for _ in range(n):
        dx, dy = rng.integers(-3, 4, size=2)
        if kind == "axial":
            r = np.hypot(xx - 30 - dx, yy - 30 - dy)
            mask, background = (r > 14) & (r < 22) & (yy < 40 + dy), xx / 100.0
        else:
            mask, background = (xx > 55 + dx) & (xx < 90 + dx) & (yy > 70 + dy) & (yy < 80 + dy), yy / 100.0
        gain = rng.uniform(0.7, 1.2)
        images.append(np.clip(gain * (40 + 80 * background + 100 * mask) + rng.normal(0, 5, mask.shape), 0, 255))
        masks.append(mask)
    return images, masks


def test_anchor_modes_give_each_kind_of_image_an_anchor_inside_its_masks() -> None:
    (axial_images, axial), (coronal_images, coronal) = _views("axial", 30, 0), _views("coronal", 30, 1)
    images = axial_images + coronal_images + [np.zeros((100, 100))]
    masks = axial + coronal + [np.zeros((100, 100), dtype=bool)]  # an absent target does not count
    groups = [f"a{i // 3}" for i in range(30)] + [f"c{i // 3}" for i in range(30)] + ["none"]
    one = click_anchor(masks)
    assert one is not None
    # a single anchor for both kinds is inside at most one kind's masks
    assert np.mean([m[int(one[1] * 100), int(one[0] * 100)] for m in masks[:-1]]) <= 0.5
    modes = anchor_modes(images, masks, groups)
    assert len(modes) == 2
    # the mode is told by the image alone, and its anchor is (next to) the target of that image
    for image, mask in zip(axial_images + coronal_images, axial + coronal):
        x, y = nearest_mode(modes, image).anchor
        assert mask[max(0, int(y * 100) - 2):int(y * 100) + 3, max(0, int(x * 100) - 2):int(x * 100) + 3].any()
    assert nearest_mode(modes, axial_images[0]) is not nearest_mode(modes, coronal_images[0])
    # an RGB picture of the same view finds the same mode
    rgb = np.repeat(axial_images[0][..., None], 3, axis=2)
    assert nearest_mode(modes, rgb) is nearest_mode(modes, axial_images[0])
    # one kind of image: one mode, at click_anchor's point; max_modes=1 likewise
    single = anchor_modes(axial_images, axial, [f"a{i // 3}" for i in range(30)])
    assert len(single) == 1 and single[0].anchor == click_anchor(axial)
    assert len(anchor_modes(images, masks, groups, max_modes=1)) == 1
    assert anchor_modes([np.zeros((8, 8))], [np.zeros((8, 8), dtype=bool)]) == []
    with pytest.raises(ValueError, match="groups"):
        anchor_modes(axial_images, axial, ["x"])
    with pytest.raises(ValueError, match="images for"):
        anchor_modes(axial_images[:2], axial)
    with pytest.raises(ValueError, match="max_modes"):
        anchor_modes(axial_images, axial, max_modes=0)


def test_anchor_modes_round_trip_through_json_and_refuse_malformed_entries() -> None:
    (axial_images, axial), (coronal_images, coronal) = _views("axial", 30, 0), _views("coronal", 30, 1)
    modes = anchor_modes(axial_images + coronal_images, axial + coronal)
    back = [AnchorMode.from_json(json.loads(json.dumps(m.to_json()))) for m in modes]
    for a, b in zip(modes, back):
        assert a.anchor == pytest.approx(b.anchor)
        np.testing.assert_allclose(a.prototype, b.prototype, atol=1e-4)
    for bad in ({"anchor": [0.5]}, {"prototype": [[0.0]]}, {"anchor": [0.1, 0.2], "prototype": [0.0, 1.0]}, 3):
        with pytest.raises(ValueError):
            AnchorMode.from_json(bad)
    with pytest.raises(ValueError, match="no anchor modes"):
        nearest_mode([], np.ones((4, 4)))
