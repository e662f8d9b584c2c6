"""The client's fixed order of operations on an update, from training to upload.

Owned here, not by the plug-ins, because the order is what makes the guarantees compose:

1. **train** (`LocalTrainer`): the PEFT rule decides which tensors are trained and sent;
2. **clip** (`PrivacyMechanism.clip`): bound the float update, as every honest client does;
3. **attack** (simulation only, `Attack.apply`): a malicious client replaces its update *after*
   clipping would have run, so honest clipping cannot cancel the attack (a real attacker skips
   it anyway);
4. **quantise** (`ClientRound.quantise`): the protocol maps floats to what it masks (integers
   modulo 2^b for SecAgg+, float32 in plain mode);
5. **noise share** (`PrivacyMechanism.add_noise_share`): distributed DP adds its discrete noise
   to the quantised values, so the protocol never rounds it away and the server never sees a
   noise-free sum;
6. **mask / encrypt** (`ClientRound.mask`): the protocol hides the update (and its weight);
7. **upload** (`FederatedClient`): the answer to the training phase, streamed in chunks.

`privacy` and `protocols` never import each other: this module is where they meet.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from privacy.mechanisms import MechanismContext, PrivacyMechanism
from protocols.secagg import ClientRound, PhaseData
from robustness.attacks import Attack, AttackContext

__all__ = ["mechanism_context", "prepare_upload"]


def mechanism_context(
    session: ClientRound, *, round_number: int, cohort_size: int, bucket_size: int, num_values: int,
    client_id: str = "",
    clip_norm: float | None = None,
) -> MechanismContext:
    """What the privacy mechanism needs to know about this round, from the protocol's session.

    The session's own facts win (SecAgg+ knows its bucket's size, its tolerated dropouts and its
    quantisation step once advertise-keys arrived); ``bucket_size`` is the fallback (the plan's).
    ``num_values`` is the size of the update the session quantises; ``clip_norm`` the clip norm
    the server announced for the round (adaptive clipping), ``None`` for the configured one.
    """
    return MechanismContext(
        round=round_number, cohort_size=cohort_size, bucket_size=session.bucket_size or bucket_size,
        worst_case_dropouts=session.worst_case_dropouts, quantisation_step=session.quantisation_step,
        num_values=num_values, client_id=client_id, clip_norm=clip_norm,
    )


def prepare_upload(
    update: Mapping[str, np.ndarray],
    *,
    weight: float,
    privacy: PrivacyMechanism,
    session: ClientRound,
    mechanism_context: MechanismContext,
    phase_data: PhaseData,
    attack: Attack | None = None,
    attack_context: AttackContext | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[dict[str, np.ndarray], PhaseData]:
    """Run steps 2-6 on a trained update; return ``(clipped honest update, answer to upload)``.

    The clipped honest update is returned so a simulation can show it to white-box attackers.
    """
    clipped = privacy.clip(update, mechanism_context)
    sent = clipped
    if attack is not None:
        if attack_context is None or rng is None:
            raise ValueError("an attack needs its context and random generator")
        sent = attack.apply(clipped, rng=rng, context=attack_context)
    quantised = session.quantise(sent)
    noised = privacy.add_noise_share(quantised, mechanism_context)
    return clipped, session.mask(noised, weight=weight, data=phase_data)
