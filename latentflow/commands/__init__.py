"""Subcommands of the `latentflow` CLI, one module each (see `latentflow.cli`)."""

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's help with each option's default appended, except where the help already says what the default is
    (no "(default: the pipeline's) (default: None)"), there is none to show (None, an empty list) or the option is a
    flag (no "--no-floors ... (default: True)")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.nargs == 0 or action.default is None or action.default == []:
            return text
        return super()._get_help_string(action)
