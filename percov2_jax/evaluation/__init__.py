"""Sharded evaluation of the codec (issue 6): datasets, the run, reports and plots."""
