#!/usr/bin/env python3
"""Make the country -> capital task for the SmolLM2 demo, and score the base model.

A two-digit addition task was tried first and dropped: it needs arithmetic
that a 135M model does not have (base model 0/100). Here the base model already knows many
capitals (measured below with a natural prompt) but does not answer in the
task's format: the bare capital followed by EOS. So an adapter only has to
learn the format, and the base model's knowledge is the ceiling it can reach.

Rows are JSONL ``{"prompt": "Country: France\\nCapital:", "completion": " Paris"}``:
the completion starts with a space and the prompt does not end in one. That
keeps the token boundary clean: the byte-level BPE attaches a leading space
to the word after it, so tokenize(prompt + completion) ==
tokenize(prompt) + tokenize(completion) and the capital is the same
space-prefixed token(s) (" Paris") that the base model uses in running text.
A prompt ending in a space ("France -> " + "Paris") is not clean: jointly
the space is part of the " Paris" token, split it is a lone " " token. The
script asserts the boundary for every row. In this format the base model
often names the right capital but then goes on with a newline instead of
EOS, so strict exact match is 0 while the loose score is not: what is
missing is the format. Our pipeline appends EOS (<|im_end|>, id 2) to the
completion when training. Formats compared on 32 countries before choosing
(strict / loose): "{c} -> " 0/0 and "Country: {c}\\nCapital: " 0/0 (both
boundary not clean), "{c} ->" + " cap" 0/0, "Country: {c}\\nCapital:\\n"
0/1, "Capital of {c}:\\n" 0/0, "Country: {c}\\nCapital:" + " cap" 0/15.

The countries are a hand-written list of sovereign states whose capital is
uncontested and has one common ASCII English spelling; states with several
capitals or a disputed capital (South Africa, Bolivia, Israel, Côte d'Ivoire,
Sri Lanka, Benin, Tanzania, Burundi, Eswatini, ...), accented or variously
transliterated names (Brasília, Bogotá, Kyiv/Kiev, Ulaanbaatar, Sana'a, ...),
city-states whose capital is the country name (Singapore, Monaco, Luxembourg,
Djibouti, ...) and ambiguous country names (Georgia) are left out. The list
is shuffled with --seed (default 0); the first --train (default 100)
countries are the train rows, the rest the eval rows.

    python scripts/make_smollm2_capitals.py --output models/smollm2-capitals \\
        --model models/smollm2-135m

After writing the data the script scores the base model on the eval rows:

* strict exact match (the project's protocol): the prompt is tokenized with
  add_special_tokens=True, generation is greedy for at most
  len(tokenize(completion, add_special_tokens=False)) + 1 new tokens, and a
  row is a hit when the generated ids start with completion ids + [eos];
* loose: the decoded generation, stripped, starts with the capital (the
  completion stripped; case-sensitive);
* knowledge ceiling: with the natural prompt "The capital of {country} is",
  greedy for 6 new tokens, the decoded text, stripped, starts with the
  capital. This counts the eval capitals the base model knows at all.
  (With this small model the natural prompt often answers "the capital of
  X." instead, so the capitals right in either prompt, known_either, are
  the better ceiling.)

Results go to base_eval.json in the output dir. Use --no-eval to only write
the data.
"""

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent

PROMPT_FORMAT = "Country: {country}\nCapital:"
COMPLETION_FORMAT = " {capital}"
NATURAL_FORMAT = "The capital of {country} is"
NATURAL_NEW_TOKENS = 6

# (country, capital): common English names, ASCII spelling.
CAPITALS = [
    # Europe
    ("Albania", "Tirana"),
    ("Andorra", "Andorra la Vella"),
    ("Armenia", "Yerevan"),
    ("Austria", "Vienna"),
    ("Azerbaijan", "Baku"),
    ("Belarus", "Minsk"),
    ("Belgium", "Brussels"),
    ("Bosnia and Herzegovina", "Sarajevo"),
    ("Bulgaria", "Sofia"),
    ("Croatia", "Zagreb"),
    ("Cyprus", "Nicosia"),
    ("Czech Republic", "Prague"),
    ("Denmark", "Copenhagen"),
    ("Estonia", "Tallinn"),
    ("Finland", "Helsinki"),
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Greece", "Athens"),
    ("Hungary", "Budapest"),
    ("Iceland", "Reykjavik"),
    ("Ireland", "Dublin"),
    ("Italy", "Rome"),
    ("Latvia", "Riga"),
    ("Liechtenstein", "Vaduz"),
    ("Lithuania", "Vilnius"),
    ("Malta", "Valletta"),
    ("Moldova", "Chisinau"),
    ("Montenegro", "Podgorica"),
    ("Netherlands", "Amsterdam"),
    ("North Macedonia", "Skopje"),
    ("Norway", "Oslo"),
    ("Poland", "Warsaw"),
    ("Portugal", "Lisbon"),
    ("Romania", "Bucharest"),
    ("Russia", "Moscow"),
    ("Serbia", "Belgrade"),
    ("Slovakia", "Bratislava"),
    ("Slovenia", "Ljubljana"),
    ("Spain", "Madrid"),
    ("Sweden", "Stockholm"),
    ("Switzerland", "Bern"),
    ("Turkey", "Ankara"),
    ("United Kingdom", "London"),
    # Asia
    ("Afghanistan", "Kabul"),
    ("Bahrain", "Manama"),
    ("Bangladesh", "Dhaka"),
    ("Bhutan", "Thimphu"),
    ("Brunei", "Bandar Seri Begawan"),
    ("Cambodia", "Phnom Penh"),
    ("China", "Beijing"),
    ("East Timor", "Dili"),
    ("India", "New Delhi"),
    ("Indonesia", "Jakarta"),
    ("Iran", "Tehran"),
    ("Iraq", "Baghdad"),
    ("Japan", "Tokyo"),
    ("Jordan", "Amman"),
    ("Kazakhstan", "Astana"),
    ("Kuwait", "Kuwait City"),
    ("Kyrgyzstan", "Bishkek"),
    ("Laos", "Vientiane"),
    ("Lebanon", "Beirut"),
    ("Malaysia", "Kuala Lumpur"),
    ("Nepal", "Kathmandu"),
    ("North Korea", "Pyongyang"),
    ("Oman", "Muscat"),
    ("Pakistan", "Islamabad"),
    ("Philippines", "Manila"),
    ("Qatar", "Doha"),
    ("Saudi Arabia", "Riyadh"),
    ("South Korea", "Seoul"),
    ("Syria", "Damascus"),
    ("Tajikistan", "Dushanbe"),
    ("Thailand", "Bangkok"),
    ("Turkmenistan", "Ashgabat"),
    ("United Arab Emirates", "Abu Dhabi"),
    ("Uzbekistan", "Tashkent"),
    ("Vietnam", "Hanoi"),
    # Africa
    ("Algeria", "Algiers"),
    ("Angola", "Luanda"),
    ("Botswana", "Gaborone"),
    ("Burkina Faso", "Ouagadougou"),
    ("Cape Verde", "Praia"),
    ("Central African Republic", "Bangui"),
    ("Comoros", "Moroni"),
    ("Democratic Republic of the Congo", "Kinshasa"),
    ("Egypt", "Cairo"),
    ("Eritrea", "Asmara"),
    ("Ethiopia", "Addis Ababa"),
    ("Gabon", "Libreville"),
    ("Gambia", "Banjul"),
    ("Ghana", "Accra"),
    ("Guinea", "Conakry"),
    ("Guinea-Bissau", "Bissau"),
    ("Kenya", "Nairobi"),
    ("Lesotho", "Maseru"),
    ("Liberia", "Monrovia"),
    ("Libya", "Tripoli"),
    ("Madagascar", "Antananarivo"),
    ("Malawi", "Lilongwe"),
    ("Mali", "Bamako"),
    ("Mauritania", "Nouakchott"),
    ("Mauritius", "Port Louis"),
    ("Morocco", "Rabat"),
    ("Mozambique", "Maputo"),
    ("Namibia", "Windhoek"),
    ("Niger", "Niamey"),
    ("Nigeria", "Abuja"),
    ("Republic of the Congo", "Brazzaville"),
    ("Rwanda", "Kigali"),
    ("Senegal", "Dakar"),
    ("Seychelles", "Victoria"),
    ("Sierra Leone", "Freetown"),
    ("Somalia", "Mogadishu"),
    ("South Sudan", "Juba"),
    ("Sudan", "Khartoum"),
    ("Tunisia", "Tunis"),
    ("Uganda", "Kampala"),
    ("Zambia", "Lusaka"),
    ("Zimbabwe", "Harare"),
    # Americas
    ("Argentina", "Buenos Aires"),
    ("Bahamas", "Nassau"),
    ("Barbados", "Bridgetown"),
    ("Belize", "Belmopan"),
    ("Canada", "Ottawa"),
    ("Chile", "Santiago"),
    ("Cuba", "Havana"),
    ("Dominica", "Roseau"),
    ("Dominican Republic", "Santo Domingo"),
    ("Ecuador", "Quito"),
    ("El Salvador", "San Salvador"),
    ("Guatemala", "Guatemala City"),
    ("Guyana", "Georgetown"),
    ("Haiti", "Port-au-Prince"),
    ("Honduras", "Tegucigalpa"),
    ("Jamaica", "Kingston"),
    ("Mexico", "Mexico City"),
    ("Nicaragua", "Managua"),
    ("Panama", "Panama City"),
    ("Peru", "Lima"),
    ("Saint Kitts and Nevis", "Basseterre"),
    ("Saint Lucia", "Castries"),
    ("Saint Vincent and the Grenadines", "Kingstown"),
    ("Suriname", "Paramaribo"),
    ("Trinidad and Tobago", "Port of Spain"),
    ("Uruguay", "Montevideo"),
    ("Venezuela", "Caracas"),
    # Oceania
    ("Australia", "Canberra"),
    ("Fiji", "Suva"),
    ("Marshall Islands", "Majuro"),
    ("Micronesia", "Palikir"),
    ("New Zealand", "Wellington"),
    ("Papua New Guinea", "Port Moresby"),
    ("Samoa", "Apia"),
    ("Solomon Islands", "Honiara"),
    ("Tuvalu", "Funafuti"),
    ("Vanuatu", "Port Vila"),
]


def make_rows(n_train: int, seed: int):
    countries = [c for c, _ in CAPITALS]
    assert len(set(countries)) == len(countries), "duplicate country"
    if not 0 < n_train < len(CAPITALS):
        sys.exit(f"--train must be in 1..{len(CAPITALS) - 1}")
    pairs = list(CAPITALS)
    random.Random(seed).shuffle(pairs)
    rows = [
        {"prompt": PROMPT_FORMAT.format(country=c),
         "completion": COMPLETION_FORMAT.format(capital=cap),
         "country": c, "capital": cap}
        for c, cap in pairs
    ]
    return rows[:n_train], rows[n_train:]


def write_jsonl(path: Path, rows):
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n")


def check_boundaries(tok, rows):
    """tokenize(prompt + completion) must equal tokenize(prompt) + tokenize(completion)."""
    bad = []
    for r in rows:
        joint = tok(r["prompt"] + r["completion"], add_special_tokens=True).input_ids
        split = (tok(r["prompt"], add_special_tokens=True).input_ids
                 + tok(r["completion"], add_special_tokens=False).input_ids)
        if joint != split:
            bad.append(r["country"])
    return bad


def greedy(model, tok, prompt: str, max_new_tokens: int):
    import torch

    p_ids = tok(prompt, add_special_tokens=True).input_ids
    inp = torch.tensor([p_ids])
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    out = model.generate(
        input_ids=inp,
        attention_mask=torch.ones_like(inp),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    return out[0, len(p_ids):].tolist()


def evaluate(model_dir: Path, rows):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    eos = tok.eos_token_id

    strict = loose = known = either = 0
    per_row = []
    t0 = time.time()
    with torch.no_grad():
        for r in rows:
            c_ids = tok(r["completion"], add_special_tokens=False).input_ids
            gen = greedy(model, tok, r["prompt"], len(c_ids) + 1)
            hit = gen[: len(c_ids) + 1] == c_ids + [eos]
            lhit = tok.decode(gen, skip_special_tokens=True).strip().startswith(r["capital"])
            nat = greedy(model, tok, NATURAL_FORMAT.format(country=r["country"]), NATURAL_NEW_TOKENS)
            nat_text = tok.decode(nat, skip_special_tokens=True)
            khit = nat_text.strip().startswith(r["capital"])
            strict += hit
            loose += lhit
            known += khit
            either += lhit or khit
            per_row.append(
                {
                    "country": r["country"],
                    "completion": r["completion"],
                    "generated_ids": gen,
                    "generated_text": tok.decode(gen, skip_special_tokens=False),
                    "exact_match": hit,
                    "loose_match": lhit,
                    "natural_text": nat_text,
                    "known": khit,
                }
            )
    n = len(rows)

    def rate(count):
        return count / n if n else 0.0

    return {
        "model": str(model_dir),
        "prompt_format": PROMPT_FORMAT,
        "completion_format": COMPLETION_FORMAT,
        "rows": n,
        "eos_token_id": eos,
        "exact_match": strict,
        "exact_match_rate": rate(strict),
        "loose_match": loose,
        "loose_match_rate": rate(loose),
        "natural_prompt": NATURAL_FORMAT,
        "natural_new_tokens": NATURAL_NEW_TOKENS,
        "known": known,
        "known_rate": rate(known),
        "known_either": either,
        "known_either_rate": rate(either),
        "seconds": round(time.time() - t0, 1),
        "per_row": per_row,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default=str(REPO_ROOT / "models" / "smollm2-capitals"))
    ap.add_argument("--train", type=int, default=100,
                    help=f"train countries; the other ones of {len(CAPITALS)} are eval")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=str(REPO_ROOT / "models" / "smollm2-135m"),
                    help="converted model dir (scripts/convert_smollm2.py)")
    ap.add_argument("--no-eval", action="store_true", help="only write the data")
    args = ap.parse_args()

    train, ev = make_rows(args.train, args.seed)
    assert not ({r["country"] for r in train} & {r["country"] for r in ev})

    model_dir = Path(args.model)
    have_model = (model_dir / "tokenizer.json").exists()
    if have_model:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir))
        bad = check_boundaries(tok, train + ev)
        if bad:
            sys.exit(f"prompt/completion token boundary not clean for: {bad}")
        print(f"token boundary clean for all {len(train) + len(ev)} rows")
    elif not args.no_eval:
        sys.exit(f"{model_dir} has no tokenizer.json: run scripts/convert_smollm2.py first (or pass --no-eval)")

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", ev)
    print(f"wrote {out / 'train.jsonl'} ({len(train)} rows), {out / 'eval.jsonl'} ({len(ev)} rows)")
    print(f"first train row: {json.dumps({'prompt': train[0]['prompt'], 'completion': train[0]['completion']})}")

    if args.no_eval:
        return
    res = evaluate(model_dir, ev)
    (out / "base_eval.json").write_text(json.dumps(res, indent=2) + "\n")
    for s in res["per_row"][:5]:
        print(f"  {s['country']!r}: {s['generated_text']!r} (want {s['completion']!r}) ids={s['generated_ids']}"
              f" | natural: {s['natural_text']!r}")
    n = res["rows"]
    print(
        f"base model on {n} eval rows: exact-match (ids start with completion+[eos={res['eos_token_id']}]) "
        f"{res['exact_match']}/{n} = {res['exact_match_rate']:.3f}; "
        f"loose (text starts with capital) {res['loose_match']}/{n} = {res['loose_match_rate']:.3f}; "
        f"knows the capital with {NATURAL_FORMAT!r}: {res['known']}/{n} = {res['known_rate']:.3f}; "
        f"right capital in either prompt (loose or natural): {res['known_either']}/{n} "
        f"[{res['seconds']}s]"
    )


if __name__ == "__main__":
    main()
