"""The settings of one quantization method, as the Quantize wizard's options step offers them.

Design choice: the widgets are made for one method at a time, from what the core says the
method has (its weight widths in `METHOD_LIST`, the fields of its default config), each set to
the method's default; `chosen` reads them back into the wizard's `Choices`.
"""

from __future__ import annotations

import dataclasses

from textual.containers import Vertical
from textual.widget import Widget
from textual.widgets import Checkbox, Label, RadioButton, RadioSet, Static

from periphery_app.quantize_choices import Choices, bits_label, settings_of
from periphery_core.quantize.config import CALIBRATION_METHODS, method_config, method_info


class MethodOptions(Vertical):
    """Weight bits (where a method has several widths), calibration method, per-channel."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.method = ""  # the method the widgets were made for

    async def show_method(self, method: str) -> None:
        """Make the widgets for `method`, at its defaults (kept as set if made for it already)."""
        if method == self.method:
            return
        await self.remove_children()
        defaults = method_config(method)
        settings = settings_of(method)
        info = method_info(method)
        widgets: list[Widget] = []
        if len(info.bits) > 1:
            widgets += [
                Label(bits_label(info), classes="section"),
                RadioSet(*(RadioButton(f"{b} bits", value=b == info.default_bits, id=f"bits-{b}")
                           for b in info.bits), id="bits"),
            ]
        else:
            widgets.append(Static(f"Weights: {info.bits[0]} bits", classes="note"))
        if "calibration" in settings:
            current = getattr(defaults, "calibration", "minmax")
            widgets += [
                Label("Calibration method", classes="section"),
                RadioSet(*(RadioButton(c, value=c == current, id=f"calibration-{c}")
                           for c in CALIBRATION_METHODS), id="calibration"),
            ]
        if "per_channel" in settings:
            widgets.append(Checkbox("Per-channel weights",
                                    value=bool(getattr(defaults, "per_channel", False)),
                                    id="per-channel"))
        await self.mount_all(widgets)
        self.method = method

    @property
    def first_setting(self) -> Widget | None:
        """The setting that takes the focus when the step shows (None: the method has none)."""
        return next(iter(self.query("RadioSet, Checkbox")), None)

    def chosen(self, choices: Choices) -> Choices:
        """`choices` with the settings as set here (None where the method has no such one)."""
        bits: int | None = None
        calibration: str | None = None
        per_channel: bool | None = None
        for radio in self.query(RadioSet):
            pressed = radio.pressed_button
            if pressed is None or pressed.id is None:
                continue
            value = pressed.id.partition("-")[2]
            if radio.id == "bits":
                bits = int(value)
            else:
                calibration = value
        for box in self.query(Checkbox):
            per_channel = box.value
        return dataclasses.replace(choices, bits=bits, calibration=calibration,
                                   per_channel=per_channel)
