"""The style example's data transform and style statistic, on hand-computed images."""
import numpy as np

from demo.style_lora import bold_strokes, ink_coverage


def paper(size=5):
    """A blank ``[1, 3, size, size]`` image: paper is +1."""
    return np.ones([1, 3, size, size], dtype=np.float32)


def test_bold_strokes_grow_each_ink_pixel_to_its_3x3_neighbourhood():
    image = paper()
    image[:, :, 2, 2] = -1.0  # full ink
    image[:, :, 0, 4] = 0.0  # half ink in a corner
    bold = bold_strokes(image)[0, 0]
    expected_ink = np.zeros([5, 5])
    expected_ink[0:2, 3:5] = 0.5
    expected_ink[1:4, 1:4] = 1.0  # the full-ink dot wins where they overlap
    np.testing.assert_allclose((1 - bold) / 2, expected_ink, atol=0)
    assert bold_strokes(paper()).min() == 1.0  # blank paper stays blank


def test_ink_coverage_is_mean_ink_over_pixels():
    image = paper(4)
    image[:, :, :2, :] = -1.0  # half the pixels fully inked
    image[:, :, 2, 0] = 0.0  # one more pixel half inked
    assert ink_coverage(image) == (8 + 0.5) / 16
    assert ink_coverage(np.full([2, 3, 4, 4], -3.0, np.float32)) == 1.0  # values outside [-1, 1] are clipped
