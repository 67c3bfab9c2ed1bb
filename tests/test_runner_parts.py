"""Runner parts without processes: output splitting and limits, the script channel, the catalog."""
from hacer.scriptdir import ScriptDir, script_id
from hacer.scripting import decode_line, encode_entry
from runner.output import OutputSplitter


def test_lines_split_across_reads():
    splitter = OutputSplitter()
    assert splitter.feed(b"hel") == []
    assert splitter.feed(b"lo\nwor") == [("output", "hello")]
    assert splitter.feed(b"ld\r\n\n") == [("output", "world"), ("output", "")]
    assert splitter.finish() == []


def test_structured_entries_pass_and_forged_ones_do_not():
    splitter = OutputSplitter()
    line = encode_entry("sent_set", '"on": "1"').encode()
    forged = encode_entry("output", "x").replace("output", "exit_status").encode()
    assert splitter.feed(line + forged) == [("sent_set", '"on": "1"'), ("output", forged.decode().rstrip("\n"))]


def test_long_lines_and_total_limit_are_cut_and_said():
    splitter = OutputSplitter(line_limit=10, total_limit=60)
    entries = splitter.feed(b"x" * 25 + b"\nshort\n" + b"y" * 30)
    entries += splitter.feed(b"yyy\nmore\nand more\n") + splitter.finish()
    assert entries[0] == ("output", "xxxxxxxxxx [hacer: 15 more bytes of this line cut]")
    assert entries[1] == ("output", "short")
    assert len(entries) == 3 and "output cut" in entries[-1][1]
    assert splitter.cut_lines == 2


def test_scripts_are_found_only_in_the_listing(tmp_path):
    (tmp_path / "lamp.py").write_text("")
    (tmp_path / "_helper.py").write_text("")
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.py").write_text("")
    scripts = ScriptDir(tmp_path)
    assert [s.name for s in scripts.list()] == ["lamp"]
    assert scripts.find("lamp").path == tmp_path / "lamp.py" and scripts.find("lamp.py")
    for name in ("../lamp", "sub/x", "_helper", str(tmp_path / "lamp"), "notes"):
        assert scripts.find(name) is None
    assert scripts.find_id(script_id("lamp")).name == "lamp"
    assert script_id("lamp") == int(__import__("hashlib").md5(b"lamp").hexdigest()[:8], 16)


def test_decode_line_is_lenient():
    assert decode_line("plain") == ("output", "plain")
    assert decode_line("\x1ehacer-entry {bad json") == ("output", "\x1ehacer-entry {bad json")
