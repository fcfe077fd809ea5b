"""The SEG's frames come from the mask the reader built from the same files, or not at all."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from monai.transforms import LoadImage

from medfed.client.predict.dicom_seg import frames_for_instances
from tests.dicom_series import write_series


def test_frames_follow_the_tags_or_refuse_a_geometry_the_reader_did_not_use(tmp_path):
    stored = np.zeros((5, 8, 6), np.int16)
    stored[2, 1:3, 4] = 100  # slice 2, rows 1-2, column 4
    series = write_series(tmp_path / "s", stored, "MR", (0.7, 0.9, 2.0))
    image = LoadImage(reader="PydicomReader", image_only=True)(str(series))
    mask = (image.numpy() == 100).astype(np.uint8)
    instances = sorted(
        (pydicom.dcmread(p) for p in series.iterdir()), key=lambda d: d.InstanceNumber
    )
    frames = frames_for_instances(mask, image.affine.numpy(), instances)
    np.testing.assert_array_equal(frames, stored == 100)
    misread = image.affine.numpy() @ np.diag([1.0, 1.0, 0.5, 1.0])  # the slice step lost
    with pytest.raises(ValueError, match="do not match the geometry the image reader used"):
        frames_for_instances(mask, misread, instances)
