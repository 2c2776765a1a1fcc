"""A seeded generator of fundus-like photographs with exact vessel masks and clinical texts (the offline default set).

Every image is rendered from `numpy.random.default_rng([seed, part, index])`, so the set is identical for one seed,
different for another, and any image can be rendered on its own (in any order, on any thread).

Anatomy (sizes in units of the image side S, so they hold at 512 px and at 128 px alike): circular field of view on
black (diameter 0.94 S), orange-red background with vignetting and choroidal texture, an optic disc (diameter
0.11-0.14 S) with a cup, a branching artery/vein tree leaving the disc and arching around a darker macula with a
foveal reflex (0.25-0.29 S from the disc).

Disease signs:

- dr: 10-40 microaneurysms (radius 0.002-0.004 S, small on purpose), 3-12 blot haemorrhages (0.008-0.02 S), 8-40
  hard exudates in 1-3 clusters near the macula (0.003-0.009 S), 0-3 cotton-wool spots (0.012-0.025 S).
- amd: 15-60 soft drusen around the macula (radius 0.004-0.013 S), 2-8 pigment clumps, geographic atrophy
  (0.03-0.06 S) in 35 % of eyes.
- glaucoma: cup-to-disc ratio 0.65-0.9 (normal 0.2-0.5) with a rim notch, sometimes peripapillary atrophy.
- retinitis_pigmentosa (late RP): 90-200 bone-spicule pigment clusters (arms 0.006-0.018 S) in the mid-periphery,
  attenuated vessels (0.45 x the width, fewer branches), waxy pale disc; rp_moderate 30-70 spicules, vessels 0.62 x,
  a slightly pale disc; rp_mild 8-25 spicules, vessels 0.82 x; narrow_vessels a normal fundus with vessels 0.66 x.
- stargardt: macular atrophy (radius 0.035-0.075 S) with 20-70 yellow pisciform flecks (0.012-0.032 S long) over the
  posterior pole; macular_atrophy an atrophic scar (0.045-0.08 S) with 2-6 pigment clumps and 0-4 faint spots;
  ga_flecks 2-4 foveal-sparing patches of atrophy with 15-40 yellow flecks and drusen-like dots.
- choroideremia: scalloped chorioretinal atrophy from the periphery inward, exposing choroidal vessels on white
  sclera, around a spared, lobed central island (radius 0.12-0.26 S plus scallops); vessels 0.8 x the width.
- best_disease: a yellow egg-yolk vitelliform lesion at the fovea (radius 0.05-0.09 S), intact (60 %), layered
  (pseudohypopyon, 20 %) or scrambled (20 %).
- chm_carrier: patchy, moth-eaten depigmentation of the periphery with 15-40 fine pigment dots.

Difficulty (fixed module constants, set before any model comparison; ranges are drawn per image):

- `LESION_COUNTS`, `LESION_RADII`: the lesion count and radius ranges above.
- `NOISE_SIGMA` = (0.005, 0.02): standard deviation of the (uniform, per channel) pixel noise, in units of full
  intensity.
- `BLUR_SIGMA` = (0.2, 0.8) px at 512 (scaled with S): Gaussian blur of the whole photo (binomial approximation).
- `ILLUMINATION`: gain 0.75-1.15, vignetting 0.15-0.45, a linear gradient of amplitude up to 0.2 in a random
  direction and low-frequency blotches of 0.05; a colour cast of +-0.04 per channel.
- Confounders drawn for every class: tessellated (visible choroidal vessel) fundus in 20 % of images, 0-2 faint
  dust shadows, left/right eye, disc position and vessel tree.

The vessel mask is exact: vessels are drawn last (nothing occludes them) and the mask is the drawn binary mask
clipped to the field of view.

The StoneRounds-like part is where photo and history complete each other (docs/data.md): every case has a
presentation (`PRESENTATIONS`): a look (which picture is drawn: a label's signs, a look two labels share, or the
label's stage at the patient's age, `STAGES`) and a kind of history (`HISTORIES`), written as a clinic writes it
(`case_record`: comorbidity, pressures, negations and complaints at each label's rates, `CLINIC` and `COMORBIDITY`;
some histories missing, uninformative or misleading). Phenocopies draw another label's look (RP sine pigmento and a
hypertensive eye share narrowed vessels, late-onset Stargardt and atrophic AMD foveal-sparing atrophy with flecks,
Best disease and an adult-onset vitelliform lesion the egg yolk, a physiological large cup and early glaucoma the
cup); overlapping histories are one kind written for two labels. Where both are shared the labels draw that look at
ages that never overlap (Best disease's atrophic scar after 30, Stargardt's atrophy before 17; choroideremia's
RP-like clumping before 18, RP's from 18 to 49; late-onset Stargardt's atrophy with flecks before 66, AMD's from 66),
so only the age read with the photo decides: those photos are `age_dependent`. Cases are numbered in a shuffled
order (`_label_blind`); a two-photo case shows both eyes. The FIVES- and HRF-like parts draw their label's look and
carry no text.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter



from .sources import LABEL_NAMES, PAPER_SOURCES, case_text


# ---------------------------------------------------------------------------------------------------------------------
# Difficulty constants (see the module docstring). Radii are fractions of the image side S.
LESION_COUNTS = {
    "microaneurysm": (10, 40),
    "haemorrhage": (3, 12),
    "exudate": (8, 40),
    "cotton_wool": (0, 3),
    "drusen": (15, 60),
    "pigment_clump": (2, 8),
    "bone_spicule": (90, 200),  # dense, late RP
    "bone_spicule_moderate": (30, 70),
    "bone_spicule_mild": (8, 25),
    "fleck": (20, 70),
}
LESION_RADII = {
    "microaneurysm": (0.002, 0.004),
    "haemorrhage": (0.008, 0.02),
    "exudate": (0.003, 0.009),
    "cotton_wool": (0.012, 0.025),
    "drusen": (0.004, 0.013),
    "pigment_clump": (0.003, 0.008),
    "geographic_atrophy": (0.03, 0.06),
    "bone_spicule": (0.006, 0.018),  # arm length
    "fleck": (0.006, 0.016),  # half length
    "stargardt_atrophy": (0.035, 0.075),
    "macular_atrophy": (0.045, 0.08),
    "vitelliform": (0.05, 0.09),
}
NOISE_SIGMA = (0.005, 0.02)
BLUR_SIGMA = (0.2, 0.8)
ILLUMINATION = {"gain": (0.75, 1.15), "vignetting": (0.15, 0.45), "gradient": 0.2, "blotches": 0.05, "cast": 0.04}
TESSELLATION_PROBABILITY = 0.2
FOV_RADIUS = 0.47  # of S

# The paper's mix: FIVES (800, four acquired classes, no text), HRF (45, no text), StoneRounds (about 460, text).
DEFAULT_COMPOSITION = {
    "fives": {"normal": 200, "amd": 200, "dr": 200, "glaucoma": 200},
    "hrf": {"normal": 15, "dr": 15, "glaucoma": 15},
    "stonerounds": {
        "retinitis_pigmentosa": 120,
        "stargardt": 90,
        "choroideremia": 60,
        "best_disease": 60,
        "normal": 50,
        "amd": 40,
        "dr": 20,
        "glaucoma": 20,
    },
}
# 89 images: every split gets every class of FIVES and HRF and both sides of every phenocopy pair and of every
# overlapping history but the carriers' (4 one-photo cases per presentation: 1 test, 1 validation, 2 train), the
# age-dependent looks among them (24 photos).
TINY_COMPOSITION = {
    "fives": {"normal": 4, "amd": 4, "dr": 4, "glaucoma": 4},
    "hrf": {"normal": 3, "dr": 3, "glaucoma": 3},
    "stonerounds": {
        "retinitis_pigmentosa": {"male@rp_moderate": 4, "sine_pigmento": 4},
        "choroideremia": {"male@rp_moderate": 4},
        "stargardt": {"central_blur@macular_atrophy": 4, "late_onset@ga_flecks": 4},
        "best_disease": {"central_blur@macular_atrophy": 4, "typical@best_disease": 4},
        "amd": {"blur@ga_flecks": 4, "vitelliform": 4},
        "normal": {"diabetes": 4, "glaucoma_family": 4, "large_cup": 4, "hypertensive": 4},
        "dr": {"typical": 4},
        "glaucoma": {"typical": 4, "early": 4},
    },
}
FIVES_TRAIN_FRACTION = 0.75  # FIVES' official 600 / 200 split
SECOND_EYE_PROBABILITY = 0.35  # a StoneRounds-like case shows both eyes this often

# Reflectance colours (RGB in [0, 1]) before illumination.
COLOURS = {
    "background": (0.78, 0.34, 0.15),
    "macula": (0.55, 0.2, 0.09),
    "disc": (0.95, 0.72, 0.48),
    "waxy_disc": (0.97, 0.88, 0.66),
    "cup": (1.0, 0.93, 0.78),
    "artery": (0.72, 0.16, 0.08),
    "vein": (0.48, 0.07, 0.05),
    "blood": (0.42, 0.04, 0.03),
    "exudate": (0.98, 0.88, 0.38),
    "cotton_wool": (0.95, 0.9, 0.8),
    "drusen": (0.93, 0.78, 0.42),
    "pigment": (0.16, 0.09, 0.05),
    "atrophy": (0.9, 0.72, 0.52),
    "sclera": (0.97, 0.92, 0.82),
    "choroid": (0.8, 0.3, 0.14),
    "fleck": (0.96, 0.86, 0.46),
    "yolk": (1.0, 0.76, 0.16),
    "shadow": (0.3, 0.12, 0.06),
}


@dataclass(frozen=True)
class SyntheticItem:
    """One image to render: its place in the plan and its example fields (the image itself is rendered lazily)."""

    part: str  # "fives" | "hrf" | "stonerounds"
    index: int  # with the seed and part it fixes the image (the order planned, by label: never shown)
    label: str
    case_id: str
    text: str
    official_split: str | None
    presentation: str = ""  # StoneRounds-like cases: the name in PRESENTATIONS[label]
    look: str = ""  # the picture drawn (one of LOOKS); "" means the label's own
    history: str = ""  # the kind of history written (HISTORIES), "uninformative", or "" for none
    eye: str = ""  # "right" | "left"; "" drawn with the photo
    age_dependent: bool = False  # look and history kind shared with another label: the age decides
    number: int = -1  # the photo's number in its part, label-blind (shuffled): names its file


# ---------------------------------------------------------------------------------------------------------------------
# Planning: which images, labels, cases and texts.


def scale_composition(num_images: int, composition: dict | None = None) -> dict:
    """Scale a composition (part -> label -> count) to `num_images` in total, by largest remainders."""
    composition = composition or DEFAULT_COMPOSITION
    cells = [(part, label, _images(count)) for part, counts in composition.items() for label, count in counts.items()]
    total = sum(count for _, _, count in cells)
    exact = [count * num_images / total for _, _, count in cells]
    floors = [int(x) for x in exact]
    by_remainder = sorted(range(len(cells)), key=lambda i: (floors[i] - exact[i], i))
    for i in by_remainder[: num_images - sum(floors)]:
        floors[i] += 1
    scaled = {}
    for (part, label, _), count in zip(cells, floors):
        if count:
            scaled.setdefault(part, {})[label] = count
    return scaled


def plan(num_images: int | None = None, seed: int = 0, composition: dict | None = None) -> list[SyntheticItem]:
    """List the images of the set: labels, case grouping, texts and FIVES-like official splits, all seeded; within
    each part, cases come in a shuffled order and are numbered in it, so that neither the order nor a case id nor a
    file name follows the label."""
    if composition is None:
        composition = DEFAULT_COMPOSITION if num_images is None else scale_composition(num_images)
    elif num_images is not None:
        composition = scale_composition(num_images, composition)
    if not sum(_images(count) for counts in composition.values() for count in counts.values()):
        raise ValueError(f"num_images / composition: the synthetic set would be empty ({composition})")
    unknown = {label for counts in composition.values() for label in counts} - set(LABEL_NAMES)
    if unknown or set(composition) - set(PAPER_SOURCES):
        raise ValueError(
            f"composition: parts must be {'/'.join(PAPER_SOURCES)} and labels in {LABEL_NAMES}, got {composition}"
        )
    planners = {"fives": _plan_fives, "hrf": _plan_hrf, "stonerounds": _plan_stonerounds}
    items = []
    for part, counts in composition.items():
        rng = np.random.default_rng([seed, _PART_IDS[part], 1_000_003])
        items.extend(_label_blind(planners[part](counts, rng), rng))
    return items


_PART_IDS = {part: k for k, part in enumerate(PAPER_SOURCES)}  # seeds each part's generator: fives 0, hrf 1, ...
CASE_IDS = {"fives": "synthetic_fives/{:04d}", "stonerounds": "synthetic_stonerounds/case_{:04d}"}  # HRF: patients


def _label_blind(items: list[SyntheticItem], rng: np.random.Generator) -> list[SyntheticItem]:
    """The items case by case in a shuffled order, numbered in that order (case ids too, except HRF's patients,
    which hold every class); each keeps its `index`, so its photo is the one planned."""
    cases = {}
    for item in items:
        cases.setdefault(item.case_id, []).append(item)
    shuffled = []
    for number, key in enumerate(rng.permutation(len(cases))):
        for item in list(cases.values())[key]:
            case_id = CASE_IDS[item.part].format(number + 1) if item.part in CASE_IDS else item.case_id
            shuffled.append(replace(item, case_id=case_id, number=len(shuffled)))
    return shuffled


def _images(count) -> int:
    """Images of a composition cell: a count, or {presentation: one-photo cases}."""
    return sum(count.values()) if isinstance(count, dict) else count


def _plan_fives(counts: dict, rng: np.random.Generator) -> list[SyntheticItem]:
    items = []
    for label, count in counts.items():
        num_train = round(count * FIVES_TRAIN_FRACTION)
        for k in range(count):
            split = "train" if k < num_train else "test"
            items.append(SyntheticItem("fives", len(items), label, f"{label}_{k}", "", split))
    return items


def _plan_hrf(counts: dict, rng: np.random.Generator) -> list[SyntheticItem]:
    # HRF's image number is the patient: patient k has the k-th image of every class.
    items = []
    for label, count in counts.items():
        for k in range(count):
            items.append(SyntheticItem("hrf", len(items), label, f"synthetic_hrf/{k + 1:02d}", "", None))
    return items


def _plan_stonerounds(counts: dict, rng: np.random.Generator) -> list[SyntheticItem]:
    """Cases of one or two eyes (the second the other eye); each case gets one presentation, allocated to the label's
    cases by `PRESENTATIONS` shares (largest remainders, then shuffled) so that every presentation of a label with
    enough cases is present, and a record (`case_record`): its text, the kind written and the age that stages a
    STAGED look. A count may instead be {presentation: cases} (one photo each), as in `TINY_COMPOSITION`: each such
    case is drawn again until it is the presentation as named (its own kind of history written, and for a name
    "<presentation>@<look>" that stage drawn)."""
    cases = []
    for label, count in counts.items():
        if isinstance(count, dict):
            unknown = {name.split("@")[0] for name in count} - set(PRESENTATIONS[label])
            if unknown:
                raise ValueError(f"composition: {label} has no presentation {sorted(unknown)}; "
                                 f"known: {sorted(PRESENTATIONS[label])}")
            cases += [(label, name, 1) for name, n in count.items() for _ in range(n)]
        else:
            eyes = []
            while sum(eyes) < count:
                left = count - sum(eyes)
                eyes.append(2 if left >= 2 and rng.random() < SECOND_EYE_PROBABILITY else 1)
            names = _allocate(PRESENTATIONS[label], len(eyes))
            cases += [(label, names[i], n) for i, n in zip(rng.permutation(len(names)), eyes)]
    items = []
    for number, (label, name, eyes) in enumerate(cases):
        name, _, wanted = name.partition("@")
        look, kind, _ = PRESENTATIONS[label][name]
        for _ in range(100 if isinstance(counts[label], dict) else 1):
            text, written, age = case_record(label, kind, rng)
            staged = stage_look(label, age, name) if look == STAGED else look
            if written == kind and staged == (wanted or staged):
                break
        first = _pick(rng, ["right", "left"])
        age_dependent = written in (kind, "uninformative") and is_age_dependent(label, staged, written)
        for eye in (("right", "left") if first == "right" else ("left", "right"))[:eyes]:
            items.append(SyntheticItem("stonerounds", len(items), label, str(number), text, None, name, staged,
                                       written, eye, age_dependent))
    return items


def _allocate(presentations: dict, num_cases: int) -> list[str]:
    """`num_cases` presentation names in proportion to their shares (largest remainders; ties to the first)."""
    names = list(presentations)
    exact = [presentations[name][2] * num_cases for name in names]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(names)), key=lambda i: (counts[i] - exact[i], i))[: num_cases - sum(counts)]:
        counts[i] += 1
    return [name for name, n in zip(names, counts) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------------------
# The StoneRounds-like part: photo and history complete each other, as in the clinic (see the data documentation,
# docs/data.md). A presentation is (look, history kind, share of the label's cases): the look is which picture is
# drawn (a label's signs, a shared look such as "large_cup", or STAGED: the label's stage at the patient's age,
# `STAGES`), the history kind which history is written. A look drawn for two labels is a phenocopy (the history
# separates them); a history kind written for two labels is an overlapping history (the photo separates them). Where
# both are shared, the patient's age separates them: the look is one label's early stage and the other's late one
# (the age-dependent subset, `age_dependent`).

STAGED = "staged"
PRESENTATIONS = {
    "retinitis_pigmentosa": {
        "typical": (STAGED, "rod_cone_dystrophy", 0.33),  # dominant, recessive, Usher or no known family
        # A male, simplex or with an X-linked family (a third of the kind's: X-linked RP is 10-15 % of RP); history
        # as choroideremia's.
        "male": (STAGED, "male_night_blindness", 0.45),
        "sine_pigmento": ("narrow_vessels", "rod_cone_dystrophy", 0.17),  # photo as a hypertensive normal eye's
        "carrier": ("rp_mild", "x_linked_carrier", 0.05),  # a female carrier of X-linked RP with patchy spicules
    },
    "choroideremia": {
        "male": (STAGED, "male_night_blindness", 0.80),  # history as RP's in a male
        "gene_tested": (STAGED, "x_linked_chm", 0.10),
        "carrier": ("chm_carrier", "x_linked_carrier", 0.10),  # a female carrier: patchy peripheral mottling
    },
    "stargardt": {
        "typical": (STAGED, "juvenile_macular", 0.20),
        "central_blur": (STAGED, "central_blur", 0.60),  # history as Best's
        "late_onset": (STAGED, "adult_macular", 0.20),  # history as AMD's; foveal-sparing atrophy with flecks
    },
    "best_disease": {
        "typical": (STAGED, "dominant_macular", 0.20),
        "central_blur": (STAGED, "central_blur", 0.80),  # history as Stargardt's
    },
    "amd": {
        "typical": ("amd", "elderly_macular", 0.15),
        "atrophic": ("ga_flecks", "elderly_macular", 0.15),  # photo as late-onset Stargardt's
        "vitelliform": ("best_disease", "elderly_macular", 0.30),  # photo as Best's (adult-onset vitelliform lesion)
        "blur": (STAGED, "adult_macular", 0.40),  # history as late-onset Stargardt's
    },
    "normal": {
        "screening": ("normal", "no_complaints", 0.20),
        "hypertensive": ("narrow_vessels", "hypertension", 0.15),  # photo as RP sine pigmento's
        "diabetes": ("normal", "diabetes", 0.25),  # history as DR's
        "glaucoma_family": ("normal", "glaucoma_family", 0.15),  # history as glaucoma's
        "large_cup": ("large_cup", "large_cup_workup", 0.25),  # photo as early glaucoma's
    },
    "dr": {"typical": ("dr", "diabetes", 1.0)},  # history as a diabetic's without retinopathy
    "glaucoma": {
        "typical": ("glaucoma", "glaucoma_family", 0.50),  # history as a normal eye's with a family history
        "early": ("large_cup", "field_loss", 0.50),  # photo as a physiological large cup's
    },
}
# Each inherited disease's look by the patient's age (first age of each stage): Best disease's egg yolk becomes an
# atrophic scar in adult life; Stargardt disease shows macular atrophy with few flecks in childhood, flecks spreading
# later; choroideremia looks like RP (pigment clumping) in childhood before its scalloped atrophy; RP goes from a
# few spicules to dense spicules with narrow vessels and a waxy disc. So "macular_atrophy" is Best disease after 30
# and Stargardt disease before 17, "rp_moderate" choroideremia before 18 and RP from 18 to 49.
STAGES = {
    "best_disease": ((0, "best_disease"), (30, "macular_atrophy")),
    "stargardt": ((0, "macular_atrophy"), (17, "stargardt")),
    "choroideremia": ((0, "rp_moderate"), (18, "choroideremia")),
    "retinitis_pigmentosa": ((0, "rp_mild"), (18, "rp_moderate"), (50, "retinitis_pigmentosa")),
    # By presentation: late-onset Stargardt disease is foveal-sparing atrophy with flecks, then widespread flecks;
    # AMD drusen, then geographic atrophy from the late sixties; so "ga_flecks" is Stargardt disease before 66 and
    # AMD from 66.
    "stargardt/late_onset": ((0, "ga_flecks"), (66, "stargardt")),
    "amd/blur": ((0, "amd"), (66, "ga_flecks")),
}
LOOKS = [*LABEL_NAMES, "large_cup", "macular_atrophy", "ga_flecks", "rp_mild", "rp_moderate", "narrow_vessels",
         "chm_carrier"]
CUP_TO_DISC = {"normal": (0.2, 0.5), "glaucoma": (0.65, 0.9), "large_cup": (0.6, 0.8)}


def stage_look(label: str, age: int, presentation: str = "") -> str:
    """The look of `label`'s stage at `age` (`STAGES`: the presentation's own stages, else the label's)."""
    return [look for start, look in STAGES.get(f"{label}/{presentation}", STAGES.get(label)) if age >= start][-1]


# History kinds: what a clinician writes for a case (`clinical_case`): the age (`ages`: ranges drawn with equal
# weight; `onset`: the range of the age of onset, always below the age; or `years`: a duration), the sex (None:
# either), a complaint, the family, the tests, and a gene where genetic testing would have found one (share `gene`),
# never a diagnosis. A kind is written the same way whichever label it is drawn for (the label is not an input), so
# an overlapping history carries nothing about the label but what its age does; `CLINIC` then adds what each
# label's patients bring besides (comorbidity, pressure, complaints, negations) at their rates. {Pos}/{pos}: his or
# her.
HISTORIES = {
    "rod_cone_dystrophy": {
        "ages": [(8, 62)], "onset": (5, 30), "sex": None,
        "complaint": ["Night blindness since age {onset}, with a slowly shrinking visual field.",
                      "Difficulty seeing in dim light since age {onset}; bumps into objects at the sides."],
        "family": [("Father and paternal aunt have the same night vision problem.", "RHO"),
                   ("Parents unaffected; a sister has night blindness and was born with hearing loss.", "USH2A"),
                   ("Parents unaffected; no family history known.", "PRPH2")],
        "tests": ["Full-field ERG: rod responses extinguished, cone responses reduced.",
                  "Goldmann fields constricted to 15 degrees; rod ERG severely reduced."],
        "gene": 0.5,
    },
    "male_night_blindness": {
        # Childhood and adult visits equally often, so that the age is no clue to the label by itself; a third of
        # the families X-linked (a maternal uncle or grandfather), the rest simplex.
        "ages": [(6, 16), (20, 55)], "onset": (3, 12), "sex": "male",
        "complaint": ["Night blindness since early childhood (age {onset}); the side vision has narrowed since.",
                      "Poor vision in the dark since age {onset} and progressive peripheral field loss."],
        "family": [("A maternal uncle has the same condition; the mother has no complaints.", None),
                   ("{Pos} maternal grandfather was affected; parents unaffected.", None),
                   ("No family history of eye disease.", None), ("Adopted; family history unknown.", None),
                   ("Parents unaffected; no other relatives affected.", None),
                   ("Parents and siblings unaffected.", None)],
        "tests": ["ERG reduced in a rod-cone pattern; central acuity preserved.",
                  "Visual fields constricted; genetic testing pending."],
        "gene": 0.0,
    },
    "x_linked_carrier": {
        "ages": [(25, 65)], "onset": None, "sex": "female",
        "complaint": ["Examined because {pos} son has night blindness; mild difficulty in dim light.",
                      "{Pos} brother has night blindness from childhood; examined as a relative. No complaints."],
        "family": [("Maternal uncle also affected.", None), ("", None)],
        "tests": ["ERG mildly reduced.", "Visual fields full."],
        "gene": 0.0,
    },
    "juvenile_macular": {
        "ages": [(8, 45)], "onset": (6, 20), "sex": None,
        "complaint": ["Gradual loss of central vision since age {onset}; difficulty reading and recognising faces.",
                      "Blurred central vision first noticed at school at age {onset}."],
        "family": [("Parents unaffected; a brother has similar central vision loss.", "ABCA4"),
                   ("Parents are first cousins; no other affected relatives.", "ABCA4")],
        "tests": ["Fluorescein angiography shows a dark choroid.", "Central scotoma on perimetry."],
        "gene": 0.6,
    },
    "adult_macular": {
        # Visits before and after 66 equally often (see male_night_blindness).
        "ages": [(45, 65), (66, 88)], "onset": None, "years": (1, 8), "sex": None,
        "complaint": ["Slowly progressive central blur over {years} years; difficulty reading.",
                      "Difficulty reading for {years} years; the very centre seems spared."],
        "family": [("No family history known.", None), ("Parents died young; family history unknown.", None)],
        "tests": ["Autofluorescence ordered.", "Central visual field relative scotoma."],
        "gene": 0.0,
    },
    "dominant_macular": {
        "ages": [(5, 62)], "onset": (4, 30), "sex": None,
        "complaint": ["Mild blur of central vision noticed at age {onset}.",
                      "Found on an eye examination at age {onset}; reading slightly harder."],
        "family": [("Father and paternal grandmother have similar macular lesions.", "BEST1"),
                   ("Mother and a sibling have similar macular lesions.", "BEST1")],
        "tests": ["EOG Arden ratio 1.2 with a full-field ERG within limits.",
                  "EOG light rise markedly reduced; ERG within limits."],
        "gene": 0.5,
    },
    "central_blur": {
        # Childhood and adult visits equally often (see male_night_blindness).
        "ages": [(7, 16), (35, 60)], "onset": None, "years": (1, 6), "sex": None,
        "complaint": ["Gradual central blur over the past {years} years; difficulty reading.",
                      "Blurred central vision and mild distortion for {years} years."],
        "family": [("No family history known.", None), ("Adopted; family history unknown.", None)],
        "tests": ["No electrophysiology done yet.", "Full-field ERG within limits."],
        "gene": 0.0,
    },
    "elderly_macular": {
        "ages": [(66, 89)], "onset": (60, 88), "sex": None,
        "complaint": ["Gradual central blur and distortion since age {onset}.",
                      "Difficulty reading fine print since age {onset}; straight lines look wavy."],
        "family": [("", None)],
        "tests": ["EOG Arden ratio 2.0.", "The fellow eye shows soft drusen.", "Amsler grid: distortion centrally."],
        "gene": 0.0,
    },
    "no_complaints": {
        "ages": [(18, 80)], "onset": None, "sex": None,
        "complaint": ["Routine examination; no visual complaints.", "Seen for new glasses; no other complaints."],
        "family": [("No family history of eye disease.", None), ("", None)],
        "tests": ["Visual fields full.", "Visual fields full on confrontation."],
        "gene": 0.0,
    },
    "hypertension": {
        "ages": [(45, 85)], "onset": (35, 80), "sex": None,
        "complaint": ["Hypertension since age {onset}, on two drugs; routine eye review.",
                      "Treated for high blood pressure since age {onset}; no visual complaints."],
        "family": [("No family history of eye disease.", None), ("", None)],
        "tests": ["Visual fields full.", "Visual fields full on confrontation."],
        "gene": 0.0,
    },
    "diabetes": {
        "ages": [(30, 80)], "onset": (28, 75), "sex": None,
        "complaint": ["Type 2 diabetes since age {onset}, HbA1c {hba1c} %; annual eye screening.",
                      "Type 2 diabetes diagnosed at age {onset}, HbA1c {hba1c} %; referred from diabetic screening."],
        "family": [("", None), ("{Pos} mother has type 2 diabetes.", None)],
        "tests": ["Microalbuminuria on the last check.", "Kidney function within limits."],
        "gene": 0.0,
    },
    "glaucoma_family": {
        "ages": [(40, 80)], "onset": None, "sex": None,
        "complaint": ["Referred for screening: the father uses eye drops for raised eye pressure.",
                      "Asymptomatic; a brother and the mother are treated for raised eye pressure."],
        "family": [("", None)],
        "tests": ["First eye examination.", "Fields not yet tested."],
        "gene": 0.0,
    },
    "large_cup_workup": {
        "ages": [(25, 75)], "onset": None, "sex": None,
        "complaint": ["Referred by the optician for a large optic cup; no complaints.",
                      "Large cups noted at a routine sight test; asymptomatic."],
        "family": [("No family history of eye disease.", None), ("{Pos} mother also has large optic discs.", None)],
        "tests": ["Visual fields full on repeat testing; OCT nerve fibre layer within limits.",
                  "Fields full and stable over two years."],
        "gene": 0.0,
    },
    "field_loss": {
        "ages": [(45, 85)], "onset": None, "sex": None,
        "complaint": ["Field defect found at a routine sight test.", "Noticed patchy vision on one side."],
        "family": [("No family history known.", None), ("", None)],
        "tests": ["Inferior arcuate field defect on perimetry; started on drops.",
                  "OCT shows thinning of the superior nerve fibre layer; field defect confirmed."],
        "gene": 0.0,
    },
}
HISTORIES["x_linked_chm"] = {**HISTORIES["male_night_blindness"], "family": [
    (text, "CHM") for text, _ in HISTORIES["male_night_blindness"]["family"][:2]], "gene": 1.0,
                             "tests": ["ERG reduced in a rod-cone pattern; genetic testing done.",
                                       "Visual fields constricted; genetic testing done."]}
UNINFORMATIVE = ["Referred for fundus photography.", "Seen in clinic; notes not available.",
                 "Photographed for the teaching file."]

# What a clinic's notes add, by label (rates: docs/data.md, "Histories as a clinic writes them"). Every history
# records the pressure (mmHg, both eyes) and most the blood pressure; a few cases have no history at all, a few an
# uninformative one, a few a misleading one (another label's history: a previous misdiagnosis).
CLINIC = {
    "missing": 0.10,  # no history: the photo comes alone
    "uninformative": 0.07,  # "referred for photography", with the age and sex
    "misleading": 0.03,  # another label's kind of history
    "nonspecific": 0.25,  # floaters, glare, new glasses: any label
    # Intraocular pressure: raised (22-34) in this share of each label's eyes, else 10-21. Normal-tension glaucoma
    # is about a third of open-angle glaucoma; ocular hypertension about 4 % of adults over 40.
    "raised_iop": {"glaucoma": 0.65, "normal": 0.04},
}
# Label -> [(share, sentence)]: drawn independently; each rate cited in docs/data.md.
COMORBIDITY = {
    "dr": [(0.20, "Blurred central vision for some months.")],  # diabetic macular oedema, ~1 in 5 with DR
    "normal": [(0.25, "Treated hypertension."), (0.30, "Not diabetic."), (0.25, "Denies night blindness."),
               (0.03, "Carries one ABCA4 variant (tested for a relative).")],
    "amd": [(0.60, "Treated hypertension."), (0.20, "Type 2 diabetes, diet controlled."),
            (0.25, "{Pos} mother had central vision loss in old age."), (0.15, "Current smoker."),
            (0.35, "Ex-smoker."), (0.30, "Sudden distortion in the last weeks."), (0.30, "Denies night blindness.")],
    "glaucoma": [(0.30, "Treated hypertension."), (0.15, "Type 2 diabetes.")],
    "stargardt": [(0.40, "Denies night blindness."), (0.20, "Photophobia.")],
    "best_disease": [(0.40, "Denies night blindness."), (0.15, "Mild distortion.")],
    "retinitis_pigmentosa": [(0.25, "Central vision still good."), (0.20, "Hearing unaffected."),
                             (0.15, "Photophobia.")],
    "choroideremia": [(0.25, "Central vision still good."), (0.20, "Hearing unaffected.")],
}
NONSPECIFIC = ["Occasional floaters.", "Some glare from headlights.", "Thinks the glasses need updating.",
               "Eyes feel tired when reading.", "Dry, gritty eyes."]
# Diabetes: glycaemic control is worse in those with retinopathy (HbA1c drawn in these ranges).
HBA1C = {"dr": (6.8, 11.0), None: (6.0, 9.5)}
BLOOD_PRESSURE_KINDS = {"diabetes", "hypertension", "elderly_macular", "field_loss", "glaucoma_family",
                        "no_complaints", "large_cup_workup"}


def presentation_looks(label: str, name: str) -> list[str]:
    """The looks a presentation draws: its own, or (STAGED) each stage reached at the ages of its history kind."""
    look, kind, _ = PRESENTATIONS[label][name]
    if look != STAGED:
        return [look]
    ages = HISTORIES[kind]["ages"]
    return sorted({stage_look(label, age, name) for low, high in ages for age in range(low, high + 1)})


# Which labels draw each look, and which write each history kind (the StoneRounds-like part; FIVES- and HRF-like
# photos draw their label's own look).
LOOK_LABELS = {look: sorted({label for label, ps in PRESENTATIONS.items() for name in ps
                             if look in presentation_looks(label, name)}) for look in LOOKS}
HISTORY_LABELS = {kind: sorted({label for label, ps in PRESENTATIONS.items() for _, h, _ in ps.values() if h == kind})
                  for kind in HISTORIES}
# A misleading history for a photo that decides alone: the first of these that no label drawing the photo's look
# would write.
MISLEADING_HISTORIES = ("juvenile_macular", "male_night_blindness", "elderly_macular")


def look_ages(look: str) -> dict[str, set[int]]:
    """Label -> the ages at which it draws `look` (over its presentations and their history kinds' ages)."""
    ages = {}
    for label, presentations in PRESENTATIONS.items():
        for name, (own, kind, _) in presentations.items():
            for low, high in HISTORIES[kind]["ages"]:
                for age in range(low, high + 1):
                    if (stage_look(label, age, name) if own == STAGED else own) == look:
                        ages.setdefault(label, set()).add(age)
    return ages


LOOK_AGES = {look: look_ages(look) for look in LOOKS}


def is_age_dependent(label: str, look: str, history: str) -> bool:
    """Whether only the age read with the photo tells a case's label: its look is drawn by another label too, at
    ages that never overlap (one label's early stage, the other's late one), and its history is a kind both write or
    says nothing ("uninformative", with the age and sex)."""
    ages = LOOK_AGES[look]
    writers = set(ages) if history == "uninformative" else set(HISTORY_LABELS.get(history, ()))
    sharing = [ages[other] for other in set(ages) & writers]
    return len(sharing) > 1 and sum(map(len, sharing)) == len(set().union(*sharing))


def counterfactual_history(label: str, look: str = "") -> tuple[str, str, str | None]:
    """The history to swap in for a test photo of `label` drawn with `look` ("" = the label's own), to ask whether a
    model fuses: ("phenocopy", history kind, the label that history points to) when another label draws the same
    look (a history kind with which, among the labels of this look, only that label comes: the answer should follow
    it), else ("photo decides", a history kind no label of this look writes, None) (the answer should not move)."""
    look = look or label
    drawing = set(LOOK_LABELS[look]) | {label}
    for twin in sorted(drawing - {label}):
        kinds = [h for name, (_, h, _) in PRESENTATIONS[twin].items()
                 if look in presentation_looks(twin, name) and set(HISTORY_LABELS[h]) & drawing == {twin}]
        if kinds:
            return "phenocopy", kinds[0], twin
    kind = next(k for k in MISLEADING_HISTORIES if not drawing & set(HISTORY_LABELS[k]))
    return "photo decides", kind, None


def clinical_case(history: str, rng: np.random.Generator, label: str | None = None) -> dict:
    """A StoneRounds-like case record (`age`, `sex`, `history`, maybe `gene`) of one history kind (`HISTORIES`),
    with what a clinic's notes add for `label` (`CLINIC`, `COMORBIDITY`; None: no label-specific additions)."""
    spec = HISTORIES[history]
    low, high = spec["ages"][rng.integers(len(spec["ages"]))]
    age = int(rng.integers(low, high + 1))
    onset = years = None
    if spec["onset"]:  # the onset is before today, and within the kind's range
        first, last = spec["onset"]
        onset = int(rng.integers(min(first, age - 1), min(last, age - 1) + 1))
    if spec.get("years"):  # a duration, at most the age less 3
        first, last = spec["years"]
        years = int(rng.integers(first, min(last, age - 3) + 1))
    sex = spec["sex"] or _pick(rng, ["male", "female"])
    pronouns = {"Pos": "His" if sex == "male" else "Her", "pos": "his" if sex == "male" else "her"}
    family, gene = _pick(rng, spec["family"])
    hba1c = round(float(rng.uniform(*HBA1C.get(label, HBA1C[None]))), 1)
    parts = [_pick(rng, spec["complaint"]).format(onset=onset, years=years, hba1c=hba1c, **pronouns)]
    parts += [sentence.format(**pronouns) for share, sentence in COMORBIDITY.get(label, []) if rng.random() < share]
    parts += [family.format(**pronouns), _pick(rng, spec["tests"]), _pressures(rng, label, history)]
    if rng.random() < CLINIC["nonspecific"]:
        parts.append(_pick(rng, NONSPECIFIC))
    case = {"age": age, "sex": sex, "history": " ".join(part for part in parts if part)}
    if gene and rng.random() < spec["gene"]:
        case["gene"] = gene
    return case


def _pressures(rng: np.random.Generator, label: str | None, history: str) -> str:
    """The recorded intraocular pressure of both eyes (raised at `CLINIC["raised_iop"]`'s rate for the label) and,
    for the kinds whose visit measures it, a blood pressure."""
    raised = rng.random() < CLINIC["raised_iop"].get(label, 0.0)
    first = int(rng.integers(22, 35) if raised else rng.integers(10, 22))
    text = f"IOP {first} and {int(np.clip(first + rng.integers(-3, 4), 8, 40))} mmHg."
    if history in BLOOD_PRESSURE_KINDS:
        text += f" BP {int(rng.integers(112, 176))}/{int(rng.integers(66, 101))}."
    return text


def case_record(label: str, history: str, rng: np.random.Generator) -> tuple[str, str, int]:
    """A case's clinical text as a clinic has it, the history kind actually written ("" none, "uninformative", or
    another label's kind when misleading) and the patient's age (which stages the look, written or not): missing,
    uninformative and misleading at `CLINIC`'s rates, else `clinical_case` of `history` for `label`."""
    case = clinical_case(history, rng, label)
    draw = rng.random() - CLINIC["missing"]
    if draw < 0:
        return "", "", case["age"]
    draw -= CLINIC["uninformative"]
    if draw < 0:
        return case_text({**case, "history": _pick(rng, UNINFORMATIVE), "gene": None}), "uninformative", case["age"]
    if draw < CLINIC["misleading"]:
        other = _pick(rng, sorted(kind for kind, labels in HISTORY_LABELS.items() if label not in labels))
        return case_text({**clinical_case(other, rng), "gene": None}), other, case["age"]
    return case_text(case), history, case["age"]


def _pick(rng: np.random.Generator, options: list):
    return options[rng.integers(len(options))]


# ---------------------------------------------------------------------------------------------------------------------
# Rendering.


def render(item: SyntheticItem, image_size: int = 512, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Render one planned item: (image (S, S, 3) uint8, vessel mask (S, S) uint8 in {0, 255})."""
    rng = np.random.default_rng([seed, _PART_IDS[item.part], item.index])
    return render_fundus(item.look or item.label, rng, image_size, eye=item.eye)


def generate(
    num_images: int | None = None, image_size: int = 512, seed: int = 0, composition: dict | None = None
) -> Iterator[dict]:
    """Yield examples (`image` and `vessel_mask` as numpy arrays, `label`, `text`, `source`, `case_id`).

    `num_images=None` and `composition=None` give the paper's mix (`DEFAULT_COMPOSITION`, 1,305 images);
    `num_images` alone scales it; `composition` (part -> label -> count, e.g. `TINY_COMPOSITION`) replaces it.
    """
    for item in plan(num_images, seed, composition):
        image, mask = render(item, image_size, seed)
        yield {
            "image": image,
            "vessel_mask": mask,
            "label": item.label,
            "text": item.text,
            "source": f"synthetic_{item.part}",
            "case_id": item.case_id,
        }


FULL = (slice(None), slice(None))


class _Canvas:
    """Reflectance image (S, S, 3) float32, and soft layers drawn with PIL and blended in where they are non-zero."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.size, self.rng = size, rng
        self.rgb = np.empty((size, size, 3), np.float32)
        self.lesions = np.zeros((size, size), bool)  # where disease signs were drawn (for checking attention maps)

    def px(self, fraction) -> float:
        return float(fraction) * self.size

    def layer(self, draw_fn, blur: float = 0.0, region=None):
        """Draw with `draw_fn(ImageDraw)` on a black 'L' layer and blur it by `blur` px, only within its bounding box
        (or `region`): (alpha (h, w) float32 in [0, 1], region (row slice, column slice)); (None, None) if empty."""
        layer = Image.new("L", (self.size, self.size), 0)
        draw_fn(ImageDraw.Draw(layer))
        if region is None:
            box = layer.getbbox()
            if box is None:
                return None, None
            margin = int(3 * blur) + 1
            box = (max(0, box[0] - margin), max(0, box[1] - margin),
                   min(self.size, box[2] + margin), min(self.size, box[3] + margin))
            region = (slice(box[1], box[3]), slice(box[0], box[2]))
        rows, cols = region
        layer = layer.crop((cols.start, rows.start, cols.stop, rows.stop))
        if blur > 0:
            layer = layer.filter(ImageFilter.GaussianBlur(float(blur)))
        return np.asarray(layer, np.float32) * np.float32(1 / 255), region

    def blend(self, alpha, region, colour, opacity: float = 1.0) -> None:
        """rgb <- rgb + opacity * alpha * (colour - rgb) in `region`; alpha (h, w), colour (3,) or (h, w, 3)."""
        if alpha is None:
            return
        rgb = self.rgb[region]
        colour = np.asarray(colour, np.float32)
        if alpha.dtype == bool:  # a sparse binary layer (vessels, ribbons): touch only its pixels
            picked = rgb[alpha]
            picked += np.float32(opacity) * ((colour[alpha] if colour.ndim == 3 else colour) - picked)
            rgb[alpha] = picked
            return
        change = colour - rgb
        change *= (alpha * np.float32(opacity))[..., None]
        rgb += change


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish noise with features about size/cells wide: a (cells, cells) field upsampled bicubically."""
    field = Image.fromarray(rng.standard_normal((cells, cells)).astype(np.float32), mode="F")
    return np.asarray(field.resize((size, size), Image.BICUBIC), np.float32)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in units of S, centred: x (1, S) and y (S, 1) for broadcasting."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    return axis[None, :], axis[:, None]


def _window(centre, half: float, size: int):
    """The region of the square of half-side `half` (units of S) around `centre`, and its x (1, w), y (h, 1) grids."""
    x, y = _grid(size)
    (c0, r0), (c1, r1) = ((np.asarray(centre) + 0.5 + sign * half) * size for sign in (-1, 1))
    rows = slice(max(0, int(r0)), min(size, int(r1) + 1))
    cols = slice(max(0, int(c0)), min(size, int(c1) + 1))
    return (rows, cols), x[:, cols], y[rows]


def render_fundus(label: str, rng: np.random.Generator, size: int = 512, return_lesions: bool = False,
                  eye: str = "") -> tuple:
    """Render a fundus photo with the signs of `label` (a class, or another look of `LOOKS`, e.g. "large_cup": a
    normal fundus with a large cup and no notch) of the `eye` ("right": the disc right of the macula, "left", or ""
    drawn): (image (S, S, 3) uint8, vessel mask (S, S) uint8 in {0, 255}), and with `return_lesions` the mask of the
    dots and strokes of its disease signs (S, S) bool."""
    if label not in LOOKS:
        raise ValueError(f"label: {label!r} is not one of {LOOKS}")
    canvas = _Canvas(size, rng)
    # Anatomy: right or left eye, the macula near the centre and the disc 0.25-0.29 S nasal to it.
    drawn = float(rng.choice([-1.0, 1.0]))  # drawn even when given, so that the rest of the photo is the same
    eye = {"right": 1.0, "left": -1.0}.get(eye, drawn)
    macula = np.array([rng.uniform(-0.03, 0.03) - eye * 0.12, rng.uniform(-0.04, 0.04)])
    angle = rng.uniform(-0.2, 0.2)
    disc = macula + rng.uniform(0.25, 0.29) * np.array([eye * math.cos(angle), math.sin(angle)])

    _background(canvas, tessellated=label == "choroideremia" or rng.random() < TESSELLATION_PROBABILITY)
    if label == "choroideremia":
        _choroideremia(canvas, macula)
    _macula(canvas, macula, dim=label in ("stargardt", "best_disease", "macular_atrophy", "ga_flecks"))
    if label in SIGNS:
        SIGNS[label](canvas, macula, disc)
    _dust(canvas)
    _optic_disc(canvas, disc, rng.uniform(0.055, 0.07), label)
    attenuation = ATTENUATION.get(label, 1.0)
    vessel_mask = _vessels(canvas, disc, macula, attenuation)
    return (_photograph(canvas), vessel_mask, canvas.lesions) if return_lesions else (_photograph(canvas), vessel_mask)


def _background(canvas: _Canvas, tessellated: bool) -> None:
    rng, size = canvas.rng, canvas.size
    colour = np.array(COLOURS["background"], np.float32) * np.float32(rng.uniform(0.88, 1.08))
    colour += rng.uniform(-ILLUMINATION["cast"], ILLUMINATION["cast"], 3).astype(np.float32)
    texture = 1 + 0.04 * smooth_noise(rng, size, 24)
    np.multiply(texture[..., None], colour, out=canvas.rgb)
    if tessellated:
        # Choroidal vessels showing through a thin RPE: dark gaps between orange ribbons.
        canvas.blend(np.abs(smooth_noise(rng, size, 40)) < 0.25, FULL, COLOURS["pigment"], opacity=0.22)


def _macula(canvas: _Canvas, macula, dim: bool) -> None:
    """A darker macula (Gaussian, sigma 0.04-0.06 S) with a small bright foveal reflex."""
    region, x, y = _window(macula, 0.2, canvas.size)
    r2 = ((x - macula[0]) ** 2 + (y - macula[1]) ** 2) / np.float32(canvas.rng.uniform(0.06, 0.08) ** 2)
    canvas.blend(np.exp(-r2), region, COLOURS["macula"], opacity=0.5 if dim else 0.7)
    canvas.blend(np.exp(-r2 * 60), region, (1.0, 0.85, 0.6), opacity=canvas.rng.uniform(0.15, 0.35))


def _optic_disc(canvas: _Canvas, disc, radius: float, label: str) -> None:
    rng = canvas.rng
    cx, cy = (disc + 0.5) * canvas.size
    r = canvas.px(radius)
    pallor = DISC_PALLOR.get(label, 0.0)
    colour = np.float32(COLOURS["disc"]) + np.float32(pallor) * (np.float32(COLOURS["waxy_disc"]) - COLOURS["disc"])
    if label == "glaucoma" and rng.random() < 0.5:
        # Peripapillary atrophy: a pale halo around the disc.
        halo = canvas.layer(lambda d: d.ellipse([cx - 1.35 * r, cy - 1.25 * r, cx + 1.35 * r, cy + 1.25 * r], 200),
                            blur=0.15 * r)
        canvas.blend(*halo, COLOURS["atrophy"], opacity=0.5)
    disc_layer = canvas.layer(lambda d: d.ellipse([cx - r, cy - 1.08 * r, cx + r, cy + 1.08 * r], 255), 0.12 * r)
    canvas.blend(*disc_layer, colour)
    cup_r = rng.uniform(*CUP_TO_DISC.get(label, CUP_TO_DISC["normal"])) * r
    pole = float(rng.choice([-1.0, 1.0]))

    def draw_cup(draw):
        draw.ellipse([cx - cup_r, cy - 1.05 * cup_r, cx + cup_r, cy + 1.05 * cup_r], 255)
        if label == "glaucoma":
            # Rim notch: the cup reaches the rim at the inferior or superior pole.
            notch, ny = 0.3 * r, cy + pole * 0.7 * r
            draw.ellipse([cx - notch, ny - notch, cx + notch, ny + notch], 255)

    cup_layer = canvas.layer(draw_cup, blur=0.1 * r, region=disc_layer[1])
    canvas.blend(*cup_layer, COLOURS["cup"], opacity=0.85 - 0.45 * pallor)


ARTERY_WIDTH, VEIN_WIDTH = 0.007, 0.0095  # of S, where they leave the disc
MAX_BRANCH_DEPTH = 3
BRANCH_PROBABILITY = 0.07  # per step, times the attenuation


def _vessels(canvas: _Canvas, disc, macula, attenuation: float) -> np.ndarray:
    """Draw an artery and a vein tree from the disc; return the exact binary vessel mask (S, S) uint8."""
    rng, size = canvas.rng, canvas.size
    toward_macula = math.atan2(macula[1] - disc[1], macula[0] - disc[0])
    start = tuple((disc + 0.5) * size)
    x, y = _grid(size)
    fov = x**2 + y**2 < (FOV_RADIUS - 0.004) ** 2
    mask = np.zeros((size, size), bool)
    for colour, width in ((COLOURS["artery"], ARTERY_WIDTH), (COLOURS["vein"], VEIN_WIDTH)):
        layer = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(layer)
        width *= attenuation * size
        for side in (-1.0, 1.0):
            # Temporal arcades leave the disc steeply and bend back around the macula; nasal branches run outwards.
            temporal = toward_macula + side * rng.uniform(1.1, 1.45)
            _branch(draw, rng, start, temporal, -side * rng.uniform(1.2, 1.7), width, 0.7 * size, 0, attenuation)
            nasal = toward_macula + math.pi - side * rng.uniform(0.5, 0.9)
            _branch(draw, rng, start, nasal, rng.normal(0, 0.3), 0.7 * width, 0.4 * size, 1, attenuation)
        drawn = np.asarray(layer) > 0
        canvas.blend(drawn, FULL, colour, opacity=0.88)
        mask |= drawn
    return (mask & fov).astype(np.uint8) * 255


def _branch(draw, rng, start, angle, curvature, width, length, depth, attenuation) -> None:
    """Grow one vessel as a gently wiggling polyline of total turn `curvature` that tapers, spawning thinner, shorter
    side branches (fewer when attenuated); draws onto `draw`."""
    step = 0.012 * draw.im.size[0]
    steps = max(2, int(length / step))
    x, y = start
    points = [(x, y)]
    wiggles = rng.normal(0, 0.06, steps)
    for i in range(steps):
        angle += curvature / steps + wiggles[i]
        x, y = x + step * math.cos(angle), y + step * math.sin(angle)
        points.append((x, y))
        if depth < MAX_BRANCH_DEPTH and i > 1 and rng.random() < BRANCH_PROBABILITY * attenuation:
            side = float(rng.choice([-1.0, 1.0]))
            _branch(draw, rng, (x, y), angle + side * rng.uniform(0.5, 1.1), rng.normal(0, 0.6),
                    width * 0.7, length * rng.uniform(0.3, 0.5), depth + 1, attenuation)
    # Taper: three chunks of decreasing width (at least 1 px, so the mask never loses a vessel).
    per = max(1, len(points) // 3)
    for chunk in range(3):
        segment = points[chunk * per : (chunk + 1) * per + 1] if chunk < 2 else points[2 * per :]
        if len(segment) >= 2:
            draw.line(segment, fill=255, width=max(1, round(width * (1 - 0.22 * chunk))), joint="curve")


ILLUMINATION_GRID = 64  # illumination is smooth: computed on a 64 x 64 grid and upsampled


def _photograph(canvas: _Canvas) -> np.ndarray:
    """Illumination, field of view, blur and noise: the reflectance becomes an 8-bit photo (S, S, 3)."""
    rng, size = canvas.rng, canvas.size
    x, y = _grid(ILLUMINATION_GRID)
    direction = rng.uniform(0, 2 * math.pi)
    gradient = rng.uniform(0, ILLUMINATION["gradient"]) * 2
    illumination = (
        rng.uniform(*ILLUMINATION["gain"])
        - rng.uniform(*ILLUMINATION["vignetting"]) * (x**2 + y**2) / FOV_RADIUS**2
        + gradient * (math.cos(direction) * x + math.sin(direction) * y)
        + ILLUMINATION["blotches"] * smooth_noise(rng, ILLUMINATION_GRID, 6)
    ).astype(np.float32)
    illumination = Image.fromarray(illumination * np.float32(255), mode="F").resize((size, size), Image.BILINEAR)
    rgb = canvas.rgb
    rgb *= (np.asarray(illumination) * _field_of_view(size))[..., None]
    _blur(rgb, float(rng.uniform(*BLUR_SIGMA)) * size / 512)
    noise = rng.integers(-128, 128, (size, size, 3), dtype=np.int8).astype(np.float32)
    noise *= (_field_of_view(size) * np.float32(rng.uniform(*NOISE_SIGMA) * 255 / UNIFORM_INT8_STD))[..., None]
    rgb += noise
    return np.clip(rgb, 0, 255, out=rgb).astype(np.uint8)


UNIFORM_INT8_STD = 73.9  # standard deviation of integers uniform on [-128, 127]


@functools.lru_cache(maxsize=8)
def _field_of_view(size: int) -> np.ndarray:
    """(S, S) float32: 1 inside the circular field of view, 0 outside, with about one pixel of anti-aliased edge."""
    x, y = _grid(size)
    fov = np.clip((1 - np.sqrt(x**2 + y**2) / np.float32(FOV_RADIUS)) * np.float32(size * FOV_RADIUS), 0, 1)
    fov.flags.writeable = False
    return fov


def _blur(rgb: np.ndarray, sigma: float) -> None:
    """Gaussian blur of standard deviation `sigma` px in place, as repeated 3-tap binomial passes [w, 1 - 2w, w]
    along both axes (each pass adds variance 2w; w <= 1/3 keeps the kernel positive and peaked)."""
    passes = max(1, math.ceil(sigma**2 / (2 / 3)))
    w = np.float32(sigma**2 / (2 * passes))
    for _ in range(passes):
        for axis in (0, 1):
            inner = [slice(None)] * 2
            inner[axis] = slice(1, -1)
            before, after = list(inner), list(inner)
            before[axis], after[axis] = slice(None, -2), slice(2, None)
            neighbours = rgb[tuple(before)] + rgb[tuple(after)]
            neighbours -= 2 * rgb[tuple(inner)]
            neighbours *= w
            rgb[tuple(inner)] += neighbours


# ---------------------------------------------------------------------------------------------------------------------
# Disease signs. Each draws on the canvas around the macula / disc; positions are in units of S, centred.


def _around(rng, centre, r_min, r_max, n) -> np.ndarray:
    """n points (n, 2) (units of S) at distance r_min..r_max from `centre`, pulled inside the field of view."""
    angle = rng.uniform(0, 2 * math.pi, n)
    radius = np.sqrt(rng.uniform(r_min**2, r_max**2, n))
    points = centre + np.stack([np.cos(angle), np.sin(angle)], 1) * radius[:, None]
    norm = np.linalg.norm(points, axis=1, keepdims=True)
    limit = FOV_RADIUS - 0.03
    return np.where(norm > limit, points * limit / np.maximum(norm, 1e-6), points)


def _count(rng, kind) -> int:
    low, high = LESION_COUNTS[kind]
    return int(rng.integers(low, high + 1))


def _radii(rng, kind, n) -> np.ndarray:
    return rng.uniform(*LESION_RADII[kind], n)


def _dots(canvas: _Canvas, centres, radii, colour, opacity=1.0, blur=0.0, lesion=True) -> None:
    """Blend filled ellipses (centres (n, 2) and radii (n,) in units of S) of one colour, each of its own strength."""
    rng, size = canvas.rng, canvas.size
    squash = rng.uniform(0.7, 1.0, len(radii))
    strength = rng.integers(170, 256, len(radii))

    def draw(d):
        for (cx, cy), r, s, v in zip((centres + 0.5) * size, radii * size, squash, strength):
            r = max(r, 0.6)
            d.ellipse([cx - r, cy - r * s, cx + r, cy + r * s], int(v))

    _blend_sign(canvas, canvas.layer(draw, blur), colour, opacity, lesion)


def _strokes(canvas: _Canvas, centres, lengths, width, colour, opacity, blur, arms) -> None:
    """Blend short strokes of `width` px: `arms` strokes of `lengths` (units of S) leave each centre (n, 2)."""
    rng, size = canvas.rng, canvas.size
    angles = rng.uniform(0, 2 * math.pi, (len(centres), arms))
    strength = rng.integers(170, 256, len(centres))

    def draw(d):
        for (cx, cy), length, row, v in zip((centres + 0.5) * size, lengths * size, angles, strength):
            for a in row:
                d.line([(cx, cy), (cx + length * math.cos(a), cy + length * math.sin(a))], int(v), width)

    _blend_sign(canvas, canvas.layer(draw, blur), colour, opacity, lesion=True)


def _blend_sign(canvas: _Canvas, layer, colour, opacity, lesion: bool) -> None:
    alpha, region = layer
    canvas.blend(alpha, region, colour, opacity=opacity)
    if lesion and alpha is not None:
        canvas.lesions[region] |= alpha > 0.5


def _dr(canvas: _Canvas, macula, disc) -> None:
    rng = canvas.rng
    # Blot haemorrhages: two overlapping ellipses each, so they are irregular.
    n = _count(rng, "haemorrhage")
    centres = _around(rng, macula, 0.03, 0.3, n)
    radii = _radii(rng, "haemorrhage", n)
    second = centres + rng.normal(0, 0.5, (n, 2)) * radii[:, None]
    _dots(canvas, np.concatenate([centres, second]), np.concatenate([radii, radii * 0.7]), COLOURS["blood"], 0.85,
          blur=0.15 * canvas.px(radii.mean()))
    n = _count(rng, "microaneurysm")
    _dots(canvas, _around(rng, macula, 0.02, 0.28, n), _radii(rng, "microaneurysm", n), COLOURS["blood"], 0.9, 0.3)
    # Hard exudates in 1-3 (circinate) clusters near the macula.
    n = _count(rng, "exudate")
    clusters = _around(rng, macula, 0.04, 0.16, int(rng.integers(1, 4)))
    centres = clusters[rng.integers(len(clusters), size=n)] + rng.normal(0, 0.022, (n, 2))
    _dots(canvas, centres, _radii(rng, "exudate", n), COLOURS["exudate"], 0.95, 0.3)
    n = _count(rng, "cotton_wool")
    if n:
        radii = _radii(rng, "cotton_wool", n)
        centres = _around(rng, disc, 0.06, 0.2, n)
        _dots(canvas, centres, radii, COLOURS["cotton_wool"], 0.6, 0.4 * canvas.px(radii.mean()))


def _amd(canvas: _Canvas, macula, disc) -> None:
    rng = canvas.rng
    n = _count(rng, "drusen")
    radii = _radii(rng, "drusen", n)
    _dots(canvas, _around(rng, macula, 0.0, 0.11, n), radii, COLOURS["drusen"], 0.9, 0.35 * canvas.px(radii.mean()))
    n = _count(rng, "pigment_clump")
    _dots(canvas, _around(rng, macula, 0.0, 0.05, n), _radii(rng, "pigment_clump", n), COLOURS["pigment"], 0.7, 0.8)
    if rng.random() < 0.35:
        radius = _radii(rng, "geographic_atrophy", 1)
        centre = macula[None] + rng.normal(0, 0.01, (1, 2))
        _dots(canvas, centre, radius, COLOURS["atrophy"], 0.85, 0.15 * canvas.px(radius[0]))


def _retinitis_pigmentosa(canvas: _Canvas, macula, disc, stage: str = "bone_spicule") -> None:
    """Bone spicules (3-5 pigment arms from a point) over a depigmented mid-periphery; the posterior pole is spared.
    `stage`: the count's key in LESION_COUNTS (few spicules early, dense late); the depigmentation follows it."""
    rng, size = canvas.rng, canvas.size
    x, y = _grid(size)
    ring = np.clip((np.sqrt(x**2 + y**2) - 0.18) * 8, 0, 1)
    depigmentation = 0.25 * LESION_COUNTS[stage][1] / LESION_COUNTS["bone_spicule"][1]
    canvas.blend(ring, FULL, COLOURS["atrophy"], opacity=depigmentation)
    n = _count(rng, stage)
    lengths = _radii(rng, "bone_spicule", n)
    width = max(1, round(canvas.px(0.004)))
    _strokes(canvas, _around(rng, np.zeros(2), 0.2, 0.44, n), lengths, width, COLOURS["pigment"], 0.85, 0.4,
             arms=int(rng.integers(3, 6)))


def _stargardt(canvas: _Canvas, macula, disc) -> None:
    """Macular atrophy ("beaten bronze") ringed by yellow pisciform flecks over the posterior pole."""
    rng = canvas.rng
    radius = _radii(rng, "stargardt_atrophy", 1)
    _dots(canvas, macula[None], radius, (0.6, 0.42, 0.27), 0.85, 0.2 * canvas.px(radius[0]))
    n = _count(rng, "fleck")
    centres = _around(rng, macula, radius[0] * 1.1, 0.2, n)
    lengths = _radii(rng, "fleck", n)
    _strokes(canvas, centres, lengths, max(1, round(canvas.px(0.006))), COLOURS["fleck"], 0.9, 0.5, arms=2)


def _macular_atrophy(canvas: _Canvas, macula, disc) -> None:
    """An atrophic macular scar with a few pigment clumps at its edge and at most a few faint yellow spots: Best
    disease's late stage and Stargardt disease's early one alike."""
    rng = canvas.rng
    radius = _radii(rng, "macular_atrophy", 1)
    _dots(canvas, macula[None], radius, (0.6, 0.42, 0.27), 0.85, 0.2 * canvas.px(radius[0]))
    n = int(rng.integers(2, 7))
    _dots(canvas, _around(rng, macula, radius[0] * 0.7, radius[0] * 1.1, n), _radii(rng, "pigment_clump", n),
          COLOURS["pigment"], 0.7, 0.8)
    n = int(rng.integers(0, 5))
    if n:
        _dots(canvas, _around(rng, macula, radius[0], 0.12, n), _radii(rng, "drusen", n), COLOURS["fleck"], 0.5, 0.8)


def _ga_flecks(canvas: _Canvas, macula, disc) -> None:
    """Foveal-sparing patches of atrophy around the fovea with yellow flecks and drusen-like dots over the posterior
    pole: late-onset Stargardt disease and atrophic AMD alike."""
    rng = canvas.rng
    n = int(rng.integers(2, 5))
    radii = rng.uniform(0.015, 0.03, n)
    _dots(canvas, _around(rng, macula, 0.03, 0.06, n), radii, COLOURS["atrophy"], 0.85, 0.2 * canvas.px(radii.mean()))
    n = int(rng.integers(15, 41))
    _dots(canvas, _around(rng, macula, 0.04, 0.2, n), rng.uniform(0.004, 0.01, n), COLOURS["drusen"], 0.85, 0.5)
    n = _count(rng, "pigment_clump")
    _dots(canvas, _around(rng, macula, 0.0, 0.06, n), _radii(rng, "pigment_clump", n), COLOURS["pigment"], 0.6, 0.8)


def _chm_carrier(canvas: _Canvas, macula, disc) -> None:
    """A choroideremia carrier's fundus: patchy, moth-eaten depigmentation of the periphery with fine pigment."""
    rng, size = canvas.rng, canvas.size
    x, y = _grid(size)
    patches = (smooth_noise(rng, size, 30) > 0.5) * np.clip((np.sqrt(x**2 + y**2) - 0.15) * 8, 0, 1)
    canvas.blend(patches.astype(np.float32), FULL, COLOURS["atrophy"], opacity=0.45)
    n = int(rng.integers(15, 40))
    _dots(canvas, _around(rng, np.zeros(2), 0.2, 0.44, n), rng.uniform(0.002, 0.004, n), COLOURS["pigment"], 0.7, 0.3)


def _choroideremia(canvas: _Canvas, macula) -> None:
    """Scalloped atrophy: outside a lobed central island the RPE and choriocapillaris are gone, exposing choroidal
    vessels (orange ribbons) on white sclera."""
    rng, size = canvas.rng, canvas.size
    x, y = _grid(size)
    dx, dy = x - np.float32(macula[0]), y - np.float32(macula[1])
    theta = np.arctan2(dy, dx)
    island = np.float32(rng.uniform(0.12, 0.26))
    for lobes in (5, 7, 11):
        island = island + np.float32(rng.uniform(0.01, 0.035)) * np.abs(np.sin(lobes * theta / 2 + rng.uniform(0, 3)))
    edge = np.clip((np.sqrt(dx**2 + dy**2) - island) * np.float32(size * 0.08), 0, 1)
    ribbons = np.clip(1 - np.abs(smooth_noise(rng, size, 36)) * 3, 0, 1)[..., None]
    sclera = np.float32(COLOURS["sclera"])
    canvas.blend(edge, FULL, sclera + ribbons * (np.float32(COLOURS["choroid"]) - sclera), opacity=0.92)


def _best_disease(canvas: _Canvas, macula, disc) -> None:
    """A yellow egg-yolk lesion at the fovea with a dark rim: intact, layered (pseudohypopyon) or scrambled."""
    rng, size = canvas.rng, canvas.size
    radius = float(_radii(rng, "vitelliform", 1)[0])
    rim, region = canvas.layer(lambda d: d.ellipse(_box(macula, radius * 1.12, size), 255), 0.2 * canvas.px(radius))
    yolk, _ = canvas.layer(lambda d: d.ellipse(_box(macula, radius, size), 255), 0.15 * canvas.px(radius), region)
    stage = rng.random()
    if stage < 0.2:  # pseudohypopyon: the material settles in the lower half
        _, y = _grid(size)
        yolk = yolk * np.clip(0.35 + (y[region[0]] - np.float32(macula[1])) / np.float32(radius), 0.25, 1)
    elif stage < 0.4:  # scrambled egg
        yolk = yolk * np.clip(0.6 + smooth_noise(rng, size, 60)[region], 0.2, 1)
    canvas.blend(np.clip(rim - yolk, 0, 1), region, COLOURS["pigment"], opacity=0.4)
    canvas.blend(yolk, region, COLOURS["yolk"], opacity=0.95)


def _box(centre, radius, size, squash=0.9) -> list[float]:
    cx, cy = (centre + 0.5) * size
    r = radius * size
    return [cx - r, cy - r * squash, cx + r, cy + r * squash]


def _dust(canvas: _Canvas) -> None:
    """Faint, blurred dust shadows on every class, so that a dark blob alone means nothing."""
    n = int(canvas.rng.integers(0, 3))
    if n:
        radii = canvas.rng.uniform(0.01, 0.025, n)
        _dots(canvas, _around(canvas.rng, np.zeros(2), 0.0, 0.4, n), radii, COLOURS["shadow"], 0.25,
              0.6 * canvas.px(radii.mean()), lesion=False)


SIGNS = {
    "dr": _dr,
    "amd": _amd,
    "retinitis_pigmentosa": _retinitis_pigmentosa,
    "rp_moderate": functools.partial(_retinitis_pigmentosa, stage="bone_spicule_moderate"),
    "rp_mild": functools.partial(_retinitis_pigmentosa, stage="bone_spicule_mild"),
    "stargardt": _stargardt,
    "best_disease": _best_disease,
    "macular_atrophy": _macular_atrophy,
    "ga_flecks": _ga_flecks,
    "chm_carrier": _chm_carrier,
}
# Vessel width (x) and disc pallor (0 pink .. 1 waxy) by look: RP narrows the vessels and pales the disc as it
# advances; RP sine pigmento and a hypertensive normal eye share narrowed arterioles.
ATTENUATION = {"retinitis_pigmentosa": 0.45, "rp_moderate": 0.62, "rp_mild": 0.82, "narrow_vessels": 0.66,
               "choroideremia": 0.8}
DISC_PALLOR = {"retinitis_pigmentosa": 1.0, "rp_moderate": 0.45}


# ---------------------------------------------------------------------------------------------------------------------
# The age swap: an age-dependent photo's own history with the age (and the duration or onset) moved to the other
# label's stage of its look.

AGE_WRITTEN = re.compile(r"\b(\d{1,3})-year-old\b")
DURATION_WRITTEN = re.compile(r"\b(\d{1,2}) years\b")
ONSET_WRITTEN = re.compile(r"\bage (\d{1,3})\b")


def age_swapped_history(label: str, look: str, text: str, rng: np.random.Generator,
                        history: str = "") -> tuple[str, str] | None:
    """(the text with another age, the label whose stage the look is at that age) for an age-dependent photo, or None
    where the look is no other label's at any age or the text writes no age.

    The text is the photo's own, word for word, but for the age ("<age>-year-old"), drawn from the ages at which the
    other label draws `look` (`LOOK_AGES`; those its `history` kind writes, where it names one), and a duration ("<n> years") or an onset ("age <n>") that the new age
    would make impossible, cut to at most the age less 3 (a duration, as `clinical_case` draws it) or less 1 (an
    onset)."""
    others = sorted(set(LOOK_AGES[look]) - {label})
    written = AGE_WRITTEN.search(text or "")
    if not others or not written:
        return None
    twin = others[0]
    ages = LOOK_AGES[look][twin]
    written_ages = {a for low, high in HISTORIES[history]["ages"] for a in range(low, high + 1)} if history in HISTORIES \
        else set()
    age = int(_pick(rng, sorted(ages & written_ages or ages)))
    swapped = AGE_WRITTEN.sub(f"{age}-year-old", text, count=1)
    swapped = DURATION_WRITTEN.sub(lambda m: f"{min(int(m.group(1)), max(1, age - 3))} years", swapped)
    swapped = ONSET_WRITTEN.sub(lambda m: f"age {min(int(m.group(1)), age - 1)}", swapped)
    return swapped, twin
