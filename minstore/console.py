CONSOLE_HTML = b"<!doctype html><title>minstore</title>"
