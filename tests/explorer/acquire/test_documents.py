"""The text fetcher on HTML pages: the main text is extracted, boilerplate-only pages are refused."""

from explorer.acquire.documents import fetch_documents
from explorer.acquire.fetch import FetchConfig, allow_origin
from tests.explorer.acquire.fault_server import FaultServer, Route

LEAD = ("The cell is the basic structural and functional unit of all forms of life. Every cell consists of "
        "cytoplasm enclosed within a membrane; many cells contain organelles, each with a specific function.")
NAV = "<nav><a href='/'>Home</a> | <a href='/about'>About us</a> | <a href='/login'>Log in</a></nav>"
FOOTER = "<footer>Copyright 2026 Example Wiki. All rights reserved. Privacy policy.</footer>"
ARTICLE = (f"<!doctype html><html><head><meta charset='utf-8'><title>Cell (biology)</title></head><body>{NAV}"
           f"<main><article><h1>Cell (biology)</h1><p>{LEAD}</p></article></main>{FOOTER}</body></html>").encode()
BOILERPLATE = f"<!doctype html><html><head><title>Portal</title></head><body>{NAV}{FOOTER}</body></html>".encode()


def test_html_pages_give_their_main_text_and_boilerplate_is_refused():
    routes = {"/cell.html": Route(body=ARTICLE, content_type="text/html; charset=utf-8"),
              "/portal.html": Route(body=BOILERPLATE, content_type="text/html")}
    with FaultServer(routes) as srv:
        cfg = allow_origin(FetchConfig(), srv.url("/"))
        page, portal = fetch_documents([srv.url("/cell.html"), srv.url("/portal.html")], cfg, min_chars=50)
    assert page.status == "ok" and LEAD in page.text
    assert "Log in" not in page.text and "Copyright" not in page.text
    assert portal.status == "boilerplate" and "main text" in portal.reason
