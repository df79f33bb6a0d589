"""What a run or a sweep leaves for people: tables, HTML pages, expert-load plots."""
