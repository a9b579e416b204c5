"""Report: timings and plans as data → rich tables, JSON, CSV, markdown. Engine code never prints."""
