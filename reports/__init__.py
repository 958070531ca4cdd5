"""Tables -> figures -> a self-contained HTML/Markdown report. Reads tables; never trains."""
