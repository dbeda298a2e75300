"""
``servers.list``: one peer URL a line, comments and blank lines ignored, a
lone ``*`` first for a bridge, and errors that name the file and line.
"""

import os

from twisted.trial.unittest import SynchronousTestCase

from minstore.cluster.servers import (
    ServerList,
    ServersFileError,
    normalise_peer,
    parse_servers,
    read_servers,
)


class ParseTests(SynchronousTestCase):
    def test_peers(self):
        """Each line is a peer, in file order."""
        servers = parse_servers("http://a.example:8001\nhttps://b.example:8443\n", "s.list")
        self.assertEqual(servers, ServerList(peers=["http://a.example:8001", "https://b.example:8443"], bridge=False, path="s.list"))

    def test_comments_and_blank_lines(self):
        """Blank lines, whitespace and # comments are ignored."""
        text = "# peers of node 1\n\n   \n  http://a.example:1  \n\t# indented comment\n\nhttp://b.example:2\n"
        self.assertEqual(parse_servers(text).peers, ("http://a.example:1", "http://b.example:2"))

    def test_empty(self):
        """An empty file, or one of comments only, is a standalone node."""
        for text in ["", "\n\n", "# nothing here\n#http://a:1\n"]:
            servers = parse_servers(text)
            self.assertEqual((servers.peers, servers.bridge), ((), False))

    def test_bridge(self):
        """A lone * as the first entry, after comments or blank lines, makes a bridge."""
        for text in ["*\nhttp://a:1\n", "# bridge\n\n  *  \nhttp://a:1\n"]:
            servers = parse_servers(text)
            self.assertEqual((servers.peers, servers.bridge), (("http://a:1",), True))
        self.assertEqual(parse_servers("*\n").peers, ())
        self.assertTrue(parse_servers("*\n").bridge)

    def test_normalisation(self):
        """URLs are normalised: trailing slash dropped, default ports added, case of scheme and host lowered."""
        cases = {
            "http://a.example:8001/": "http://a.example:8001",
            "http://a.example": "http://a.example:80",
            "https://a.example": "https://a.example:443",
            "https://a.example/": "https://a.example:443",
            "HTTP://A.Example:8001": "http://a.example:8001",
            "http://127.0.0.1:8002": "http://127.0.0.1:8002",
            "http://[::1]:8002/": "http://[::1]:8002",
            "http://[::1]": "http://[::1]:80",
        }
        for line, peer in cases.items():
            self.assertEqual(normalise_peer(line), peer, line)
            self.assertEqual(parse_servers(line + "\n").peers, (peer,), line)

    def test_crlf(self):
        """Windows line endings are accepted."""
        self.assertEqual(parse_servers("*\r\nhttp://a:1\r\n").peers, ("http://a:1",))

    def assertParseError(self, text, *fragments):
        e = self.assertRaises(ServersFileError, parse_servers, text, "/etc/minstore/servers.list")
        message = str(e)
        for fragment in fragments:
            self.assertIn(fragment, message)
        self.assertNotIn("\n", message)
        return message

    def test_bad_urls(self):
        """Lines that are not http(s)://host[:port] are refused naming path:line and the line."""
        for bad in [
            "ftp://a.example:21",
            "http://",
            "http://:8001",
            "http://a.example:8001/path",
            "http://a.example:8001/?q=1",
            "http://a.example:8001#frag",
            "http://user:pw@a.example:8001",
            "http://a.example:99999",
            "http://a.example:port",
            "a.example:8001",
            "just words",
        ]:
            self.assertParseError("# c\n\n" + bad + "\n", "/etc/minstore/servers.list:3:", repr(bad))

    def test_line_numbers_count_comments(self):
        """The line number is the file's, counting comments and blank lines."""
        self.assertParseError("http://a:1\n# x\n\nhttp://b:2\nnot a url\n", "servers.list:5:")

    def test_duplicates(self):
        """A peer listed twice (even written differently) is refused on its second line."""
        self.assertParseError("http://a:80\n# again\nhttp://a/\n", "servers.list:3:", "http://a:80", "twice")
        self.assertParseError("http://a:1\nhttp://a:1\n", "servers.list:2:")

    def test_star_after_peer(self):
        """A * after a peer is refused naming path:line."""
        self.assertParseError("http://a:1\n*\n", "servers.list:2:", "'*'", "first")
        self.assertParseError("*\n*\n", "servers.list:2:")

    def test_default_path(self):
        """Without a path, errors name servers.list."""
        e = self.assertRaises(ServersFileError, parse_servers, "nope\n")
        self.assertTrue(str(e).startswith("servers.list:1: "), str(e))


class ReadTests(SynchronousTestCase):
    def test_read(self):
        """read_servers parses a file and keeps its path."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("*\nhttp://a:1/\n")
        self.assertEqual(read_servers(path), ServerList(peers=["http://a:1"], bridge=True, path=path))

    def test_missing_file(self):
        """A missing file raises ServersFileError naming it."""
        path = os.path.abspath(self.mktemp())
        e = self.assertRaises(ServersFileError, read_servers, path)
        self.assertTrue(str(e).startswith(path + ": "), str(e))
        self.assertIn("No such file", str(e))

    def test_directory(self):
        """A directory instead of a file raises ServersFileError naming it."""
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        e = self.assertRaises(ServersFileError, read_servers, path)
        self.assertTrue(str(e).startswith(path + ": "), str(e))

    def test_not_utf8(self):
        """A file that is not UTF-8 raises ServersFileError naming it."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"http://caf\xe9:1\n")
        e = self.assertRaises(ServersFileError, read_servers, path)
        self.assertEqual(str(e), "%s: not UTF-8 text" % path)

    def test_error_names_file_and_line(self):
        """A bad line in a file is reported as file:line."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("http://a:1\nftp://b:2\n")
        e = self.assertRaises(ServersFileError, read_servers, path)
        self.assertTrue(str(e).startswith("%s:2: " % path), str(e))
