"""
A seeded generator of a fictional movie world: the offline default dataset of nanocrs.

    from nanocrs.synthetic import make_world, describe_world
    items, splits = make_world(seed=0)  # 600 items, 3000/300/300 dialogs, < 1 s, stdlib only
    print(describe_world(items, splits))

`items` is a list of item dicts and `splits` is {"train": [...], "val": [...], "test": [...]},
both in the normalized schema (items.jsonl / *.jsonl dialogs) that data_prep.py writes to disk.

The world
---------
Every item has made-up title, a year in one of DECADES (1970s..2010s), 1-3 of the 8 GENRES
and a plot built from genre-specific attribute words ("haunted", "heist", "wormhole", ...),
so an item's genres and year can be read from its text. Popularity is a Zipf-like weight
1/rank^0.9 over a random permutation of the items (metadata["popularity"]).

The hidden rule (what a model has to learn)
-------------------------------------------
Each seeker has a secret profile (G, D): a genre G and a decade D, drawn uniformly among the
cells with at least MIN_CELL items, where

    cell(G, D) = {items whose genres include G and whose year is in decade D}.

At every REC turn the assistant recommends 1 item (70%) or 2 items (30%) from
cell(G, D) minus every item mentioned earlier in the dialog, drawn proportionally to popularity
(without replacement inside a turn). That candidate list, sorted by popularity (best first,
ties by id), is stored as the turn's "oracle": a model that knows the rule can do no better.
The profile is always revealed before the first REC turn:
  - G is always said in words by the user (many phrasings: "scary movies", "space stuff", ...);
  - D is said in words in ~50% of dialogs ("something from the 80s", "an eighties movie");
    otherwise it is only implied by a liked item from the cell ("I really loved @{m0042}"),
    so the model must know that item's year from the catalog;
  - ~20% of dialogs also mention a disliked item of another genre, a distractor never in the cell.
"""

import random
import re

from nanocrs.data import MENTION

GENRES = ("action", "comedy", "drama", "horror", "sci-fi", "romance", "thriller", "animation")
DECADES = (1970, 1980, 1990, 2000, 2010)
MIN_CELL = 8  # a profile's cell must hold this many items, so 3 REC turns never run dry
MIN_WORDS, MAX_WORDS = 6, 25  # every turn's length in words, so a dialog stays ~100-200 BPE tokens

# how a seeker names a genre (noun phrases; the canonical name is also used on its own)
GENRE_PHRASES = {
    "action": ["action movies", "something with explosions and car chases", "an action flick", "high-octane action"],
    "comedy": ["comedies", "something that makes me laugh", "a funny movie", "a good comedy"],
    "drama": ["a drama", "something emotional and serious", "a moving drama"],
    "horror": ["scary movies", "horror", "something that will scare me", "a creepy horror film"],
    "sci-fi": ["sci-fi", "space stuff", "science fiction", "something futuristic"],
    "romance": ["a romance", "a love story", "something romantic", "a romantic movie"],
    "thriller": ["a thriller", "something suspenseful", "a tense mystery"],
    "animation": ["animated movies", "a cartoon", "something animated", "an animated film"],
}
# plot attribute words, disjoint across genres so a plot word points at exactly one genre
GENRE_WORDS = {
    "action": ["explosion", "heist", "chase", "mercenary", "showdown", "commando",
               "bomb", "rescue", "gunfight", "agent", "convoy", "ambush"],
    "comedy": ["prank", "wedding", "roommate", "blunder", "mixup", "slacker",
               "karaoke", "vacation", "parody", "awkward", "goofy", "hilarious"],
    "drama": ["family", "grief", "courtroom", "inheritance", "addiction", "reunion",
              "factory", "memory", "divorce", "sacrifice", "farm", "letters"],
    "horror": ["ghost", "haunted", "curse", "cabin", "demon", "nightmare",
               "ritual", "zombie", "cellar", "scream", "blood", "possessed"],
    "sci-fi": ["spaceship", "android", "alien", "planet", "laser", "galaxy",
               "robot", "wormhole", "colony", "cyborg", "asteroid", "clone"],
    "romance": ["love", "kiss", "heartbreak", "courtship", "sweetheart", "honeymoon",
                "flirt", "proposal", "soulmate", "valentine", "date", "crush"],
    "thriller": ["conspiracy", "detective", "kidnapping", "spy", "witness", "stalker",
                 "hostage", "blackmail", "assassin", "alibi", "cipher", "poison"],
    "animation": ["talking", "dragon", "toy", "princess", "puppy", "magic",
                  "fairy", "cartoon", "kingdom", "penguin", "wizard", "musical"],
}
NEUTRAL_WORDS = ["city", "town", "summer", "night", "journey", "secret", "stranger",
                 "river", "island", "winter", "friends", "village", "road", "harbor"]
# plot templates: {a} = attribute word of the item's genres, {n} = neutral word; 8-14 words each
PLOT_TEMPLATES = [
    "a {a} {a} tale of {a}, {a} and {a} in a {n} {n}",
    "{a} and {a} collide when {a} meets {a} one {n}",
    "{n} {n}: {a}, {a}, {a} and a {a} {a}",
    "after the {a}, a {a} {n} faces {a} and {a}",
    "a {n} of {a} {a}, {a} {a} and one {a} {n}",
    "the {a} {n} hides {a}, {a} and a {a} {a}",
]
TITLE_ADJ = ["Silent", "Neon", "Crimson", "Hollow", "Golden", "Broken", "Midnight", "Velvet",
             "Frozen", "Burning", "Hidden", "Lonely", "Electric", "Wild", "Pale", "Distant",
             "Scarlet", "Secret", "Restless", "Painted", "Iron", "Glass", "Bitter", "Sleeping",
             "Last", "Forgotten", "Savage", "Gentle", "Shattered", "Lucky", "Quiet", "Stolen",
             "Falling", "Endless", "Copper", "Northern", "Crooked", "Bright", "Dark", "Lost"]
TITLE_NOUN = ["Orchard", "Tide", "Harbor", "Signal", "Garden", "Mirror", "Highway", "Empire",
              "Lantern", "River", "Circus", "Horizon", "Kingdom", "Station", "Promise", "Shadow",
              "Engine", "Island", "Canyon", "Carnival", "Winter", "Letter", "Summit", "Frontier",
              "Voyage", "Echo", "Storm", "Bridge", "Tower", "Desert", "Machine", "Comet",
              "Forest", "Crown", "Anthem", "Garage", "Lighthouse", "Valley", "Moon", "Diner"]
TITLE_PATTERNS = ["The {A} {N}", "{A} {N}", "The {N} of {N2}", "{N} and {N2}", "{A} {N} {R}"]
TITLE_ROMAN = ["II", "III", "Returns", "Rising", "Forever"]

DECADE_SHORT = {1970: "70s", 1980: "80s", 1990: "90s", 2000: "2000s", 2010: "2010s"}
DECADE_ADJ = {1970: "seventies", 1980: "eighties", 1990: "nineties", 2000: "2000s", 2010: "2010s"}
DECADE_PHRASES = {  # adverbial phrases that follow a noun: "scary movies {from the 80s}"
    1970: ["from the 70s", "from the seventies", "from the 1970s", "made in the 70s"],
    1980: ["from the 80s", "from the eighties", "from the 1980s", "made in the 80s"],
    1990: ["from the 90s", "from the nineties", "from the 1990s", "made in the 90s"],
    2000: ["from the 2000s", "from the noughties", "made in the 2000s", "made between 2000 and 2009"],
    2010: ["from the 2010s", "from the twenty-tens", "made in the 2010s", "made between 2010 and 2019"],
}

# ----------------------------------------------------------------------------------------------
# dialog templates. Every turn must end up MIN_WORDS..MAX_WORDS long (checked in the tests).
GREET_SHORT = ["Hi!", "Hello!", "Hey there.", "Good evening!", "Hi,", ""]
GREET_LONG = ["Hi! Can you help me find a movie?", "Hello, I need a good movie for tonight.",
              "Hey there, I am looking for something to watch.", "Good evening! Any movie ideas for me?",
              "Hi, I am bored and want to watch a film."]
SAY_GENRE = ["I'm in the mood for {gp}.", "{Gp} is what I want tonight.", "I am looking for {gp}, any ideas?",
             "Could you find me {gp} please?", "Honestly, {gp} sounds perfect right now.",
             "I mostly watch {g} movies these days.", "My friends and I want {gp}.", "Tonight I really feel like watching {gp}."]
SAY_DECADE = ["Something {dp} would be great.", "Ideally it should be {dp}.", "I'd love {an_adj} movie this time.",
              "Maybe something {older}, like {adj} stuff.", "I'm really into films {dp} lately.",
              "Preferably {dp}, that era is my favorite."]
SAY_GENRE_DECADE = ["I'm in the mood for {gp} {dp}.", "Looking for {gp} {dp}.", "Maybe {an_adj} {g} movie for tonight?",
                    "{Gp} {dp} would be perfect.", "Do you know any {g} movies {dp}?"]
SAY_LIKED = ["I really loved @{{{x}}}, it was great.", "I recently watched @{{{x}}} and loved it.",
             "Something like @{{{x}}} would be perfect.", "My all-time favorite movie is @{{{x}}}.",
             "@{{{x}}} is one of my favorites."]
SAY_DISLIKED = ["I honestly couldn't stand @{{{y}}} though.", "But please nothing like @{{{y}}}, I hated it.",
                "I did not enjoy @{{{y}}} at all.", "@{{{y}}} was way too boring for me."]
ACK = ["Great choice!", "Sounds good.", "Nice.", "Got it.", "Good taste!"]
HELLO = ["Hi!", "Hello!", "Happy to help!", "Hey!"]
ASK = {  # the assistant's clarifying question, keyed by the fact the user reveals next
    "genre": ["What kind of movies do you enjoy?", "Which genre are you in the mood for?",
              "What sort of film do you feel like watching?", "Tell me which genres you usually like."],
    "era": ["Do you prefer a certain era, or a film you loved?", "Any decade in mind, or a movie you enjoyed?"],
    "decade": ["Any particular decade you prefer?", "Old classics or something more recent?"],
    "liked": ["Is there a movie you loved recently?", "Can you name a film you really enjoyed?"],
    "disliked": ["Anything you watched recently and did not like?", "Is there a film you would rather avoid?"],
}
REC_LEAD_FIRST = ["", "Sure! ", "Got it. ", "Great, I have an idea. "]
REC_LEAD_MORE = ["", "No problem. ", "Okay, another one. ", "Sure. "]
REC_ONE = ["How about @{{{x}}}? It is {an_attr} {g} film from {year}.",
           "Try @{{{x}}}, {an_attr} {g} movie from {year}.",
           "You might like @{{{x}}}, {an_attr} {g} pick from the {short}.",
           "I'd recommend @{{{x}}}, {an_g} film with a {attr} twist.",
           "Check out @{{{x}}} from {year}. It's a great {attr} {g} film.",
           "@{{{x}}} could work, {an_attr} {g} film released in {year}."]
REC_TWO = ["How about @{{{x}}} or @{{{y}}}? Both are {g} films from the {short}.",
           "You could try @{{{x}}} ({year}) or @{{{y}}} ({year2}), both great {g} picks.",
           "Two ideas: @{{{x}}}, {an_attr} {g} film, and @{{{y}}} from {year2}.",
           "Maybe @{{{x}}} or @{{{y}}}, two {g} movies from the {short} worth watching."]
REACT_MORE = {1: ["I've already seen that one. Anything else?", "Hmm, not really my thing. Something else please?",
                  "Sounds good, but can you suggest one more?", "Seen it twice already, what else do you have?",
                  "Nice, I'll add it to my list. Another one?"],
              2: ["I've seen both already. Anything else?", "Hmm, neither grabs me. Something else please?",
                  "Good ideas, but can you suggest another one?", "Seen those already, what else do you have?"]}
REACT_DONE = {1: ["Sounds great, I'll watch it tonight. Thanks!", "Perfect, that is exactly what I wanted. Thanks, bye!",
                  "Oh nice, I haven't seen that one. Thank you!", "That looks fun, I will try it. Bye!"],
              2: ["Great, I'll watch both this weekend. Thanks!", "Perfect, those sound fun. Thank you, bye!",
                  "Nice picks, I will start with the first one. Thanks!"]}
REACT_LIKE = ["That sounds really good, I will check it out.", "Oh, that looks interesting, adding it to my list."]
ASK_MORE = ["Glad I could help! Anything else you need?", "Happy to help. Need anything else today?"]
USER_BYE = ["No, that's all for today. Thanks, bye!", "Nope, I am all set. Thank you so much!"]
BYE = ["You're welcome, enjoy the movie tonight!", "Enjoy your movie night, see you next time!",
       "Have fun watching, and come back anytime!", "My pleasure, enjoy the film! Goodbye!"]


def an(word):
    """'a' or 'an' for the word as it is read aloud ("an eighties", "an 80s", "a 2000s")."""
    return "an" if word[0].lower() in "aeiou8" else "a"


def sample_weighted(rng, pool, weight, k):
    """Draw k distinct elements of pool with probability proportional to weight(x), without replacement."""
    pool, picked = list(pool), []
    for _ in range(min(k, len(pool))):
        r = rng.random() * sum(weight(x) for x in pool)
        for i, x in enumerate(pool):
            r -= weight(x)
            if r <= 0 or i == len(pool) - 1:
                picked.append(pool.pop(i))
                break
    return picked


# ----------------------------------------------------------------------------------------------
# items

def make_items(rng, n_items):
    """n_items item dicts with unique titles; ids m0000, m0001, ..."""
    items, titles = [], set()
    for i in range(n_items):
        # genres: primary uniform, 40% get a 2nd distinct one, 15% (of all) a 3rd
        genres = [rng.choice(GENRES)]
        if rng.random() < 0.40:
            n_genres = 3 if rng.random() < 0.375 else 2
            genres += rng.sample([g for g in GENRES if g != genres[0]], n_genres - 1)
        decade = rng.choice(DECADES)
        year = decade + rng.randrange(10)
        for _ in range(1000):  # made-up titles, redrawn until unique
            title = rng.choice(TITLE_PATTERNS).format(A=rng.choice(TITLE_ADJ), N=rng.choice(TITLE_NOUN),
                                                      N2=rng.choice(TITLE_NOUN), R=rng.choice(TITLE_ROMAN))
            if title not in titles:
                break
        else:
            raise ValueError(f"n_items: cannot make {n_items} unique titles")
        titles.add(title)
        # plot: every genre contributes >= 1 attribute word, the primary genre gets the extra slots
        template = rng.choice(PLOT_TEMPLATES)
        n_a = template.count("{a}")
        slot_genres = genres + [genres[0] if rng.random() < 0.6 else rng.choice(genres) for _ in range(n_a - len(genres))]
        rng.shuffle(slot_genres)
        attrs = []
        for g in slot_genres:
            attrs.append(rng.choice([w for w in GENRE_WORDS[g] if w not in attrs]))
        neutral = rng.sample(NEUTRAL_WORDS, template.count("{n}"))
        # fill the slots (pop() takes from the end; the words are in random order anyway)
        plot = re.sub(r"\{([an])\}", lambda m: (attrs if m.group(1) == "a" else neutral).pop(), template)
        assert 8 <= len(plot.split()) <= 14, plot
        items.append({
            "id": f"m{i:04d}",
            "title": title,
            "text": f"title: {title} | year: {year} | genres: {', '.join(genres)} | plot: {plot}",
            "metadata": {"year": year, "genres": genres, "plot": plot, "decade": decade, "popularity": 0.0},
        })
    # popularity: Zipf-like weight over a random permutation, so it is unrelated to genre/decade
    order = list(range(n_items))
    rng.shuffle(order)
    for rank, idx in enumerate(order):
        items[idx]["metadata"]["popularity"] = 1.0 / (rank + 1) ** 0.9
    return items


def cells_of(items):
    """{(genre, decade): [item, ...]} for every genre/decade pair (possibly empty lists)."""
    cells = {(g, d): [] for g in GENRES for d in DECADES}
    for it in items:
        for g in it["metadata"]["genres"]:
            cells[(g, it["metadata"]["decade"])].append(it)
    return cells


# ----------------------------------------------------------------------------------------------
# dialogs

def make_turn(role, text, oracle=None):
    """A turn dict; its "items" are parsed from the text so the two can never disagree."""
    ids = []
    for x in MENTION.findall(text):  # "items" = mentioned ids in order of first mention
        if x not in ids:
            ids.append(x)
    turn = {"role": role, "text": text, "items": ids}
    if oracle is not None:
        turn["oracle"] = oracle
    return turn


def say_facts(rng, facts, ctx):
    """One user utterance that reveals the given facts (in order), e.g. genre + decade + disliked item."""
    parts, i = [], 0
    while i < len(facts):
        if set(facts[i:i + 2]) == {"genre", "decade"} and rng.random() < 0.6:
            parts.append(rng.choice(SAY_GENRE_DECADE))  # one sentence: "scary movies from the 80s"
            i += 2
            continue
        templates = {"genre": SAY_GENRE, "decade": SAY_DECADE, "liked": SAY_LIKED, "disliked": SAY_DISLIKED}
        parts.append(rng.choice(templates[facts[i]]))
        i += 1
    gp = rng.choice(GENRE_PHRASES[ctx["g"]] + [ctx["g"] + " movies"])
    adj = DECADE_ADJ[ctx["d"]]
    fill = dict(g=ctx["g"], gp=gp, Gp=gp[0].upper() + gp[1:], dp=rng.choice(DECADE_PHRASES[ctx["d"]]),
                adj=adj, an_adj=f"{an(adj)} {adj}", older="older" if ctx["d"] < 2000 else "newer",
                x=ctx.get("x"), y=ctx.get("y"))
    return " ".join(p.format(**fill) for p in parts)


def make_dialog(rng, dialog_id, items, cells, valid_cells):
    """One dialog: reveal the profile (G, D) over 1-3 user turns, then 1-3 REC turns, then goodbye."""
    G, D = rng.choice(valid_cells)
    cell = cells[(G, D)]
    ctx = {"g": G, "d": D}
    facts = ["genre"]
    if rng.random() < 0.5:
        facts.append("decade")
    else:  # decade only implied by a liked item of the cell
        facts.append("liked")
        ctx["x"] = rng.choice(cell)["id"]
    if rng.random() < 0.2:  # distractor: disliked item of another genre, hence never in the cell
        facts.append("disliked")
        ctx["y"] = rng.choice([it for it in items if G not in it["metadata"]["genres"]])["id"]
    rng.shuffle(facts)

    # split the facts over 1-3 user turns before the first REC; turn 0 may be a bare greeting
    n_pre = min(rng.choices([1, 2, 3], weights=[0.1, 0.4, 0.5])[0], len(facts) + 1)
    if n_pre == 1:
        chunks = [facts]
    else:
        n0 = 0 if rng.random() < 0.6 else rng.randint(0, len(facts) - (n_pre - 1))
        rest = facts[n0:]
        cuts = sorted(rng.sample(range(1, len(rest)), n_pre - 2)) if n_pre > 2 else []
        bounds = [0] + cuts + [len(rest)]
        chunks = [facts[:n0]] + [rest[a:b] for a, b in zip(bounds, bounds[1:])]
    assert sum(len(c) for c in chunks) == len(facts) and all(chunks[1:])

    turns = []
    for k, chunk in enumerate(chunks):
        if not chunk:
            text = rng.choice(GREET_LONG)
        else:
            for _ in range(100):  # 3 facts in one turn can get long: redraw the wording until it fits
                greet = rng.choice(GREET_SHORT) + " " if k == 0 else ""
                text = (greet + say_facts(rng, chunk, ctx)).strip()
                if MIN_WORDS <= len(text.split()) <= MAX_WORDS:
                    break
        turns.append(make_turn("user", text))
        if k + 1 < len(chunks):  # assistant CHAT: (greet or acknowledge) + ask about what comes next
            topic = chunks[k + 1][0]
            if topic in ("decade", "liked") and rng.random() < 0.5:
                topic = "era"  # generic question, answered either way
            opener = rng.choice(HELLO) if k == 0 and not chunk else rng.choice(ACK)
            turns.append(make_turn("assistant", opener + " " + rng.choice(ASK[topic])))

    # REC turns: candidates = cell minus everything mentioned so far, drawn by popularity
    pop = lambda it: it["metadata"]["popularity"]
    n_rec = rng.choices([1, 2, 3], weights=[0.25, 0.45, 0.30])[0]
    for r in range(n_rec):
        mentioned = {x for t in turns for x in t["items"]}
        cands = sorted((it for it in cell if it["id"] not in mentioned), key=lambda it: (-pop(it), it["id"]))
        assert cands, "cells hold >= MIN_CELL items: 1 liked + 3 turns x 2 picks cannot exhaust them"
        picks = sample_weighted(rng, cands, pop, 2 if rng.random() < 0.3 else 1)
        x = picks[0]
        attr = rng.choice([w for w in re.findall(r"[a-z-]+", x["metadata"]["plot"]) if w in GENRE_WORDS[G]])
        fill = dict(x=x["id"], y=picks[-1]["id"], g=G, an_g=f"{an(G)} {G}", attr=attr, an_attr=f"{an(attr)} {attr}",
                    year=x["metadata"]["year"], year2=picks[-1]["metadata"]["year"], short=DECADE_SHORT[D])
        lead = rng.choice(REC_LEAD_FIRST if r == 0 else REC_LEAD_MORE)
        text = lead + rng.choice(REC_ONE if len(picks) == 1 else REC_TWO).format(**fill)
        turns.append(make_turn("assistant", text, oracle=[it["id"] for it in cands]))
        if r + 1 < n_rec:
            turns.append(make_turn("user", rng.choice(REACT_MORE[len(picks)])))

    # closing: reaction + thanks, sometimes with one more small-talk exchange
    if rng.random() < 0.15:
        turns.append(make_turn("user", rng.choice(REACT_LIKE)))
        turns.append(make_turn("assistant", rng.choice(ASK_MORE)))
        turns.append(make_turn("user", rng.choice(USER_BYE)))
    else:
        turns.append(make_turn("user", rng.choice(REACT_DONE[len(picks)])))
    turns.append(make_turn("assistant", rng.choice(BYE)))
    return {"id": dialog_id, "turns": turns}


def make_world(seed=0, n_items=600, n_train=3000, n_val=300, n_test=300):
    """Build the fictional world: (items, {"train": [...], "val": [...], "test": [...]}), deterministic in seed."""
    if not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    if not 100 <= n_items <= 5000:
        raise ValueError(f"n_items: expected 100..5000, got {n_items}")
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if n < 0:
            raise ValueError(f"{name}: expected >= 0, got {n}")
    items = make_items(random.Random(seed), n_items)
    cells = cells_of(items)
    valid_cells = [gd for gd in cells if len(cells[gd]) >= MIN_CELL]  # uniform over these == rejection sampling
    if not valid_cells:
        raise ValueError(f"n_items: no genre/decade cell has {MIN_CELL} items")
    splits = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        # one private stream per split, so val/test do not change when n_train does
        rng = random.Random(f"nanocrs-synthetic-{seed}-{split}")
        splits[split] = [make_dialog(rng, f"syn-{split}-{i:05d}", items, cells, valid_cells) for i in range(n)]
    return items, splits


def describe_world(items, splits):
    """A few lines of statistics about a world (or any dataset in the normalized schema)."""
    n_genres = sum(len(it["metadata"].get("genres", [])) for it in items) / max(1, len(items))
    lines = [f"items: {len(items)} ({n_genres:.2f} genres/item)",
             "dialogs: " + " | ".join(f"{s} {len(d)}" for s, d in splits.items())]
    all_dialogs = [d for ds in splits.values() for d in ds]
    turns = [t for d in all_dialogs for t in d["turns"]]
    asst = [t for t in turns if t["role"] == "assistant"]
    rec = [t for t in asst if t["items"]]
    words = [len(t["text"].split()) for t in turns]
    lines.append(f"turns/dialog: {len(turns) / max(1, len(all_dialogs)):.2f}, words/turn: "
                 f"{sum(words) / max(1, len(words)):.1f} (min {min(words, default=0)}, max {max(words, default=0)})")
    lines.append(f"REC turns: {len(rec)} ({100 * len(rec) / max(1, len(asst)):.1f}% of assistant turns), "
                 f"{sum(len(t['items']) for t in rec) / max(1, len(rec)):.2f} items each")
    with_oracle = [t for t in rec if "oracle" in t]
    if with_oracle:
        sizes = [len(t["oracle"]) for t in with_oracle]
        lines.append(f"candidates (oracle list) per REC turn: mean {sum(sizes) / len(sizes):.1f}, "
                     f"min {min(sizes)}, max {max(sizes)}")
    return "\n".join(lines)


if __name__ == "__main__":
    items, splits = make_world()
    print(describe_world(items, splits))
    print(items[0]["text"])
    for t in splits["train"][0]["turns"]:
        print(f"{t['role']:>9}: {t['text']}" + (f"   [oracle: {len(t['oracle'])}]" if "oracle" in t else ""))
