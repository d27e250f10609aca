import json

import numpy as np
import pytest
from PIL import Image

from smartcrop.data import FcdbItem, GaicdItem, gaicd_splits, list_images, read_fcdb, read_gaicd


def make_gaicd(root, split="val"):
    (root / "images" / split).mkdir(parents=True)
    (root / "annotations" / split).mkdir(parents=True)
    for name in ("b", "a", "c"):
        Image.new("RGB", (40, 30)).save(root / "images" / split / f"{name}.jpg")
    # y1 x1 y2 x2 MOS; the -2 line is unrated, the blank line ignored
    (root / "annotations" / split / "a.txt").write_text("1 2 20 30 3.5\n0 0 30 40 -2\n\n2 3 25 35 2.25\n")
    (root / "annotations" / split / "b.txt").write_text("0 0 30 40 4\n1 1 20 20 3\n")
    # c has no annotation: unlabeled, skipped


def test_read_gaicd_swaps_y_x_and_skips_unrated(tmp_path):
    make_gaicd(tmp_path, "val")
    items = read_gaicd(tmp_path, "val")
    assert [it.name for it in items] == ["a", "b"]
    a = items[0]
    assert isinstance(a, GaicdItem)
    assert a.image_path == tmp_path / "images" / "val" / "a.jpg"
    assert a.boxes.tolist() == [[2, 1, 30, 20], [3, 2, 35, 25]]  # x1 y1 x2 y2, annotation order
    assert a.mos.tolist() == pytest.approx([3.5, 2.25])
    assert a.boxes.dtype == np.float32 and a.mos.dtype == np.float32
    assert a.boxes.shape == (2, 4) and a.mos.shape == (2,)
    assert items[1].boxes.tolist() == [[0, 0, 40, 30], [1, 1, 20, 20]]
    # items are hashable / comparable by name and path despite the arrays
    assert len({*items, *read_gaicd(tmp_path, "val")}) == 2


def test_read_gaicd_skips_images_with_nothing_to_rank_and_reads_a_bom(tmp_path):
    """One scored crop, or every crop scored alike, gives SRCC 0 and Acc 100 whatever the model does: such an
    image is skipped with a note.  A first line starting with a byte-order mark (Notepad) reads as text."""
    make_gaicd(tmp_path, "val")
    ann = tmp_path / "annotations" / "val"
    for name in ("d", "e"):
        Image.new("RGB", (40, 30)).save(tmp_path / "images" / "val" / f"{name}.jpg")
    (ann / "d.txt").write_text("0 0 30 40 3\n")
    (ann / "e.txt").write_text("0 0 30 40 3\n1 1 20 20 3.0\n")
    (ann / "a.txt").write_bytes(b"\xef\xbb\xbf" + (ann / "a.txt").read_bytes())
    with pytest.warns(UserWarning, match="2 annotation files score fewer than two crops differently"):
        items = read_gaicd(tmp_path, "val")
    assert [it.name for it in items] == ["a", "b"] and items[0].mos.tolist() == pytest.approx([3.5, 2.25])


@pytest.mark.parametrize("line, words", [("0 0 30 40 7", "MOS 7 is outside GAICD's 1 to 5"),
                                         ("0 0 30 40 -1.5", "MOS -1.5 is outside"),
                                         ("0 0 30 40 1e8", r"MOS 1e\+08 is outside"),
                                         ("0 0 3_0 40 3", "not numbers"), ("0 0 \u0663\u0660 40 3", "not numbers"),
                                         ("0 0 30 40 nan", "not numbers"), ("# y1 x1 y2 x2 mos", "expected")])
def test_gaicd_annotation_lines_are_plain_decimal_numbers_and_a_mos_of_1_to_5(tmp_path, line, words):
    make_gaicd(tmp_path, "val")
    (tmp_path / "annotations" / "val" / "b.txt").write_text(f"0 0 30 40 4\n{line}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=words) as e:
        read_gaicd(tmp_path, "val")
    assert "b.txt:2:" in str(e.value)


@pytest.mark.parametrize("split", ["dev", "holdout", "train", "test", "my_split"])
def test_read_gaicd_any_split_name_and_suffixes(tmp_path, split):
    make_gaicd(tmp_path, split)
    img_dir = tmp_path / "images" / split
    Image.new("RGB", (20, 20)).save(img_dir / "d.PNG")
    Image.new("RGB", (20, 20)).save(img_dir / "e.jpeg")
    (img_dir / "f.gif").write_bytes(b"")  # not a GAICD image type
    (img_dir / "notes.txt").write_text("x")
    for stem in ("d", "e", "f", "notes"):
        (tmp_path / "annotations" / split / f"{stem}.txt").write_text("0 0 10 10 3\n1 1 9 9 4\n")
    with pytest.warns(UserWarning, match="2 annotation files have no image"):  # f.gif and notes.txt are not
        items = read_gaicd(tmp_path, split)
    assert [it.name for it in items] == ["a", "b", "d", "e"]
    assert [it.image_path.name for it in items][2:] == ["d.PNG", "e.jpeg"]


def test_read_gaicd_reads_an_annotation_whose_suffix_is_upper_case(tmp_path):
    make_gaicd(tmp_path, "dev")
    ann = tmp_path / "annotations" / "dev"
    (ann / "c.TXT").write_text("0 0 30 40 4\n1 1 20 20 2\n")  # c.jpg's, as a Windows tool names it
    (ann / "z.Txt").write_text("0 0 30 40 4\n")  # no z image: counted with the orphans
    with pytest.warns(UserWarning, match="1 annotation files have no image"):
        items = read_gaicd(tmp_path, "dev")
    assert [it.name for it in items] == ["a", "b", "c"]
    assert items[2].mos.tolist() == [4, 2]
    (ann / "c.txt").write_text("0 0 30 40 1\n1 1 20 20 5\n")  # two files for one image: which is meant?
    with pytest.raises(ValueError, match=r"c\.TXT and c\.txt both annotate c\.jpg: keep one"):
        read_gaicd(tmp_path, "dev")


def test_read_gaicd_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="images/test"):
        read_gaicd(tmp_path, "test")
    make_gaicd(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match=r"images/test: .*the labeled splits of .* are train\)"):
        read_gaicd(tmp_path, "test")  # eval's default split on a folder with another: which ones there are
    ann = tmp_path / "annotations" / "train" / "b.txt"
    ann.write_text("0 0 30\n")
    with pytest.raises(ValueError, match=r"b\.txt:1"):
        read_gaicd(tmp_path, "train")
    ann.write_text("0 0 30 40 4\n\n0 0 x 40 4\n")  # line numbers count blank lines
    with pytest.raises(ValueError, match=r"b\.txt:3"):
        read_gaicd(tmp_path, "train")
    ann.write_text("0 0 30 40 4 5\n")
    with pytest.raises(ValueError, match=r"b\.txt:1"):
        read_gaicd(tmp_path, "train")
    ann.write_text("0 0 30 40 nan\n")
    with pytest.raises(ValueError, match=r"b\.txt:1"):
        read_gaicd(tmp_path, "train")
    ann.write_bytes(b"0 0 30 40 4\n\xff\xfe\n")  # not text: the file and line named
    with pytest.raises(ValueError, match=r"b\.txt:2: not text"):
        read_gaicd(tmp_path, "train")
    ann.write_text("0 0 1e39 1e39 4\n")  # finite as a float, infinite once float32
    with pytest.raises(ValueError, match=r"b\.txt:1: not finite or out of range"):
        read_gaicd(tmp_path, "train")
    ann.write_text("0 0 30 40 4\n1 1 20 20 3\n")
    Image.new("RGB", (40, 30)).save(tmp_path / "images" / "train" / "b.png")  # b.jpg and b.png: one b.txt
    with pytest.raises(ValueError, match=r"b\.txt: annotates both b\.jpg and b\.png"):
        read_gaicd(tmp_path, "train")
    (tmp_path / "images" / "train" / "b.png").unlink()
    (tmp_path / "annotations" / "train" / "z.txt").write_text("0 0 30 40 4\n")  # no z image
    with pytest.warns(UserWarning, match="1 annotation files have no image"):
        assert [it.name for it in read_gaicd(tmp_path, "train")] == ["a", "b"]
    # images but no annotations folder for that split
    (tmp_path / "images" / "holdout").mkdir()
    with pytest.raises(FileNotFoundError, match="annotations/holdout"):
        read_gaicd(tmp_path, "holdout")


def test_read_gaicd_all_unrated_image_is_skipped(tmp_path):
    make_gaicd(tmp_path, "val")
    (tmp_path / "annotations" / "val" / "b.txt").write_text("0 0 30 40 -2\n0 0 10 10 -2.0\n")
    assert [it.name for it in read_gaicd(tmp_path, "val")] == ["a"]


def test_gaicd_splits(tmp_path):
    assert gaicd_splits(tmp_path) == []
    make_gaicd(tmp_path, "val")
    make_gaicd(tmp_path, "dev")
    (tmp_path / "images" / "holdout").mkdir()  # unlabeled: no annotations
    (tmp_path / "annotations" / "orphan").mkdir()  # annotations without images
    assert gaicd_splits(tmp_path) == ["dev", "val"]


def write_fcdb(root, name, entries):
    (root / name).write_text(json.dumps(entries))


def test_read_fcdb(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 48)).save(tmp_path / "images" / "123_abc_b.jpg")
    Image.new("RGB", (64, 48)).save(tmp_path / "images" / "7_z_c.jpg")
    entries = [{"url": "https://x/y/123_abc_b.jpg", "flickr_photo_id": 123, "crop": [4, 5, 30, 20]},
               {"url": "https://x/y/missing.jpg", "flickr_photo_id": 9, "crop": [0, 0, 1, 1]},
               {"url": "https://x/7_z_c.jpg", "flickr_photo_id": 7, "crop": [0, 0, 64, 48]}]
    write_fcdb(tmp_path, "cropping_testing_set.json", entries)
    with pytest.warns(UserWarning, match="1 listed photos"):
        items = read_fcdb(tmp_path, "test")
    assert [it.name for it in items] == ["123_abc_b", "7_z_c"]  # json order, not sorted
    assert isinstance(items[0], FcdbItem)
    assert items[0].box == (4, 5, 34, 25)  # x, y, x + w, y + h
    assert items[1].box == (0, 0, 64, 48)
    assert items[0].image_path == tmp_path / "images" / "123_abc_b.jpg"
    with pytest.raises(FileNotFoundError):
        read_fcdb(tmp_path, "train")
    # a url's query or fragment is not part of the file name; a photo listed twice counts once
    entries = [{"url": "https://x/y/123_abc_b.jpg?zz=1", "crop": [4, 5, 30, 20]},
               {"url": "https://x/7_z_c.jpg#top", "crop": [0, 0, 64, 48]},
               {"url": "https://x/7_z_c.jpg", "crop": [1, 1, 10, 10]}]
    write_fcdb(tmp_path, "cropping_testing_set.json", entries)
    with pytest.warns(UserWarning, match="1 entries list a photo already listed"):
        items = read_fcdb(tmp_path, "test")
    assert [(it.name, it.box) for it in items] == [("123_abc_b", (4, 5, 34, 25)), ("7_z_c", (0, 0, 64, 48))]
    write_fcdb(tmp_path, "cropping_training_set.json", entries[2:])
    assert [it.name for it in read_fcdb(tmp_path, "train")] == ["7_z_c"]
    with pytest.raises(ValueError):
        read_fcdb(tmp_path, "dev")


def test_read_fcdb_malformed(tmp_path):
    (tmp_path / "images").mkdir()
    write_fcdb(tmp_path, "cropping_testing_set.json", [{"url": "https://x/a.jpg"}])
    with pytest.raises(ValueError, match="entry 0"):
        read_fcdb(tmp_path)
    write_fcdb(tmp_path, "cropping_testing_set.json", {"url": "https://x/a.jpg"})
    with pytest.raises(ValueError, match="list"):
        read_fcdb(tmp_path)
    (tmp_path / "cropping_testing_set.json").write_text("[{")
    with pytest.raises(ValueError, match="JSON"):
        read_fcdb(tmp_path)
    (tmp_path / "cropping_testing_set.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        read_fcdb(tmp_path)
    for url in ("null", "7", '["a.jpg"]'):
        (tmp_path / "cropping_testing_set.json").write_text(f'[{{"url": {url}, "crop": [1, 1, 5, 5]}}]')
        with pytest.raises(ValueError, match="entry 0: url .* is not text"):
            read_fcdb(tmp_path)
    for crop in ("[NaN, 10, 150, 100]", "[10, 10, 1e400, 100]", "[10, 10, 1" + "0" * 400 + ", 100]",
                 "[10, 10, 0, 100]", "[10, 10, -5, 100]", '"1234"', "[true, true, true, true]", "[10, 10, 100]",
                 '["10", 10, 150, 100]', "[10, 10, 150, 100, 5]", "{}"):
        (tmp_path / "cropping_testing_set.json").write_text(f'[{{"url": "https://x/a.jpg", "crop": {crop}}}]')
        with pytest.raises(ValueError, match=r"entry 0: crop .* is not a box"):
            read_fcdb(tmp_path)


def test_list_images(tmp_path):
    (tmp_path / "sub" / ".hidden").mkdir(parents=True)
    (tmp_path / "sub" / "deeper").mkdir()
    for p in ["x.JPG", "sub/y.png", "sub/deeper/w.TIFF", "sub/v.webp", "sub/.hidden/z.jpg", "notes.txt",
              ".dot.jpg"]:
        (tmp_path / p).write_bytes(b"")
    found = [p.relative_to(tmp_path).as_posix() for p in list_images([tmp_path])]
    assert found == ["sub/deeper/w.TIFF", "sub/v.webp", "sub/y.png", "x.JPG"]
    assert list_images([tmp_path]) == list_images([str(tmp_path)])  # deterministic, str accepted
    assert [p.name for p in list_images([tmp_path], recursive=False)] == ["x.JPG"]
    # explicit files as given (even with an unusual extension), in argument order, mixed with folders
    mixed = list_images([tmp_path / "notes.txt", tmp_path / "sub" / "deeper"])
    assert mixed == [tmp_path / "notes.txt", tmp_path / "sub" / "deeper" / "w.TIFF"]
    with pytest.raises(FileNotFoundError, match="nope"):
        list_images([tmp_path / "nope"])


def test_an_annotation_that_scores_no_crop_is_named_in_a_note(tmp_path):
    """An empty (or whitespace-only) annotation file dropped its image without a word."""
    import warnings

    from conftest import draw_photo

    for k in range(2):
        draw_photo(tmp_path / "images" / "dev" / f"i{k}.jpg", seed=k)
    (tmp_path / "annotations" / "dev").mkdir(parents=True)
    (tmp_path / "annotations" / "dev" / "i0.txt").write_text("")
    (tmp_path / "annotations" / "dev" / "i1.txt").write_text("  \n\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_gaicd(tmp_path, "dev") == []
    assert [str(w.message) for w in caught] == [
        f"{tmp_path / 'annotations' / 'dev'}: 2 annotation files score no crop (empty, or every crop unrated); skipped"]
