"""Data tables for the demo text-to-SQL corpus: domains, their columns and value generators.

Only data lives here; `corpus.py` turns it into questions and SQL. Word lists are short on
purpose: the demo model has a small tokenizer, and variety comes from combining them.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

# Value kinds: how a column's values look and which questions they allow.
TEXT, INTEGER, YEAR, FLOAT, DATE = "text", "integer", "year", "float", "date"
NUMERIC_KINDS = (INTEGER, YEAR, FLOAT)

# fmt: off
FIRST = (
    "Ann", "Ben", "Carla", "David", "Elena", "Frank", "Grace", "Hugo", "Ines", "Jack", "Kate",
    "Luis", "Maria", "Nick", "Olga", "Paul", "Rosa", "Sam", "Tom", "Vera", "Will", "Yuki",
)
LAST = (
    "Lee", "Ross", "Moreno", "Bakker", "Novak", "Silva", "Costa", "Hughes", "Park", "Walsh",
    "Okafor", "Jensen", "Kowalski", "Dumont", "Ferrara", "Grant", "Ito", "O'Neal", "O'Brien",
    "Meyer", "Price", "Stone",
)
CITIES = (
    "Dallas", "Toronto", "Boston", "Denver", "Seattle", "Miami", "Chicago", "Phoenix", "Austin",
    "Leeds", "Lyon", "Porto", "Turin", "Oslo", "Perth", "Osaka", "Madrid", "Dublin", "Quebec",
    "Bergen", "Cork", "Nantes",
)
COUNTRIES = (
    "Canada", "United States", "France", "Spain", "Italy", "Japan", "Brazil", "Norway", "Ireland",
    "Australia", "Germany", "Poland", "Kenya", "Mexico", "Portugal", "Sweden",
)
NATIONALITIES = (
    "Canada", "United States", "France", "Spain", "Italy", "Brazil", "Nigeria", "Lithuania",
    "Serbia", "Australia", "Germany", "Greece",
)
MASCOTS = (
    "Eagles", "Tigers", "Bears", "Wolves", "Hawks", "Lions", "Rams", "Sharks", "Falcons",
    "Pirates", "Stars", "Rockets",
)
ADJECTIVES = (
    "Silent", "Golden", "Broken", "Hidden", "Last", "Red", "Blue", "Lonely", "Wild", "Bright",
    "Cold", "Dark", "Little", "Endless", "Summer", "Paper",
)
NOUNS = (
    "River", "Road", "Heart", "Garden", "Night", "Mountain", "Letter", "Dream", "Storm", "City",
    "Window", "Island", "Song", "Fire", "Train", "Sky",
)
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)
# fmt: on


def person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def title(rng: random.Random) -> str:
    form = rng.randrange(4)
    adj, noun = rng.choice(ADJECTIVES), rng.choice(NOUNS)
    return [
        f"The {adj} {noun}",
        f"{adj} {noun}",
        f"{noun} of {rng.choice(CITIES)}",
        f"{adj} {noun} and {rng.choice(NOUNS)}",
    ][form]


def date(rng: random.Random) -> str:
    day, month, year = rng.randint(1, 28), rng.choice(MONTHS), rng.randint(1960, 2023)
    return f"{month} {day}, {year}" if rng.random() < 0.7 else f"{day} {month} {year}"


def pick(*options: str) -> Callable[[random.Random], str]:
    return lambda rng: rng.choice(options)


def form(template: str) -> Callable[[random.Random], str]:
    """A value from a template: {p} person, {c} city, {n} country, {m} mascot, {a} adjective,
    {o} noun, {s} surname, {d} digit 1-9, {y} year."""

    def make(rng: random.Random) -> str:
        return template.format(
            p=person(rng),
            c=rng.choice(CITIES),
            n=rng.choice(COUNTRIES),
            m=rng.choice(MASCOTS),
            a=rng.choice(ADJECTIVES),
            o=rng.choice(NOUNS),
            d=rng.randint(1, 9),
            y=rng.randint(1960, 2020),
            s=rng.choice(LAST),
        )

    return make


def game_result(rng: random.Random) -> str:
    low, high = sorted(rng.sample(range(0, 45), 2))
    return f"W {high}-{low}" if rng.random() < 0.5 else f"L {low}-{high}"


def years_span(rng: random.Random) -> str:
    start = rng.randint(1980, 2015)
    return f"{start}-{start + rng.randint(1, 6)}" if rng.random() < 0.8 else str(start)


@dataclass(frozen=True)
class ColumnSpec:
    name: str  # as in the table header, e.g. "Pop. (2010)"
    kind: str  # TEXT, INTEGER, YEAR, FLOAT or DATE
    low: float = 0  # range of numeric values
    high: float = 0
    text: Callable[[random.Random], str] | None = None  # generator of TEXT/DATE values
    phrase: str = ""  # how questions name it; the header lower-cased when empty
    summable: bool = True  # False for ids and ranks: SUM/AVG of them is meaningless
    verb: str = ""  # for years and dates: "released" gives "was released in 1999"
    counted: bool = False  # a count of things: "more than 10 goals", "the most goals"

    @property
    def said(self) -> str:
        return self.phrase or self.name.lower()

    def value(self, rng: random.Random) -> str | float:
        if self.kind == FLOAT:
            v = round(rng.uniform(self.low, self.high), 1)
            return v if not v.is_integer() else v + 0.5  # one decimal, written the same everywhere
        if self.kind in (INTEGER, YEAR):
            return float(rng.randint(int(self.low), int(self.high)))
        if self.kind == DATE:
            return (self.text or date)(rng)
        assert self.text is not None, f"text column {self.name} needs a value generator"
        return self.text(rng)


def txt(name: str, make: Callable[[random.Random], str], phrase: str = "") -> ColumnSpec:
    return ColumnSpec(name, TEXT, text=make, phrase=phrase)


def num(
    name: str,
    kind: str,
    low: float,
    high: float,
    phrase: str = "",
    summable: bool = True,
    verb: str = "",
    counted: bool = False,
) -> ColumnSpec:
    return ColumnSpec(
        name, kind, low, high, phrase=phrase, summable=summable, verb=verb, counted=counted
    )


@dataclass(frozen=True)
class Domain:
    name: str
    entity: str  # what a row is, singular ("player") and plural ("players")
    entities: str
    key: str  # the column naming the row, used in "Which player ..." questions
    people: bool  # whether "Who ..." questions fit the key column
    columns: tuple[ColumnSpec, ...]


# fmt: off
DOMAINS_DATA: tuple[Domain, ...] = (
    Domain("players", "player", "players", "Player", True, (
        txt("Player", person),
        num("No.", INTEGER, 0, 99, phrase="jersey number", summable=False),
        txt("Nationality", pick(*NATIONALITIES)),
        txt("Position", pick("Guard", "Forward", "Center", "Guard-Forward", "Forward-Center")),
        txt("Years in Toronto", years_span),
        txt("School/Club Team", form("{c} State"), phrase="school/club team"),
        num("Points", INTEGER, 0, 2500, counted=True),
    )),
    Domain("scorers", "player", "players", "Player", True, (
        txt("Player", person),
        txt("Club", form("{c} {m}")),
        num("Season", YEAR, 1990, 2023),
        num("Apps", INTEGER, 1, 50, phrase="appearances", counted=True),
        num("Goals", INTEGER, 0, 45, counted=True),
        num("Assists", INTEGER, 0, 30, counted=True),
    )),
    Domain("games", "opponent", "opponents", "Opponent", False, (
        num("Week", INTEGER, 1, 17, summable=False),
        ColumnSpec("Date", DATE, verb="played"),
        txt("Opponent", form("{c} {m}")),
        txt("Result", game_result),
        txt("Venue", form("{s} Stadium")),
        num("Attendance", INTEGER, 9000, 90000),
    )),
    Domain("elections", "district", "districts", "District", False, (
        txt("District", form("{n} {d}")),
        txt("Incumbent", person),
        txt("Party", pick("Democratic", "Republican", "Liberal", "Green", "Labour")),
        num("First elected", YEAR, 1950, 2020, verb="first elected"),
        txt("Result", pick("Re-elected", "Retired", "Lost re-election", "Defeated")),
        num("Votes", INTEGER, 1000, 250000, counted=True),
        num("Share (%)", FLOAT, 5, 80, phrase="vote share"),
    )),
    Domain("films", "film", "films", "Title", False, (
        txt("Title", title),
        txt("Director", person),
        num("Year", YEAR, 1950, 2023, verb="released"),
        txt("Genre", pick("Drama", "Comedy", "Horror", "Western", "Thriller", "Musical")),
        num("Gross (millions)", FLOAT, 1, 900, phrase="gross"),
        num("Runtime (min)", INTEGER, 70, 200, phrase="runtime"),
        num("Rating", FLOAT, 1, 10),
    )),
    Domain("cars", "car", "cars", "Model", False, (
        txt("Model", form("{a} {d}00")),
        txt("Manufacturer", pick("Ford", "Toyota", "Fiat", "Volvo", "Honda", "Renault", "Saab")),
        txt("Engine", form("{d}.{d}L V{d}")),
        num("Horsepower", INTEGER, 60, 650),
        num("Model Year", YEAR, 1970, 2024, verb="built"),
        num("Price ($)", INTEGER, 9000, 120000, phrase="price"),
        num("Top speed (km/h)", INTEGER, 120, 330, phrase="top speed"),
    )),
    Domain("schools", "school", "schools", "School", False, (
        txt("School", form("{c} High School")),
        txt("Location", pick(*CITIES)),
        num("Founded", YEAR, 1800, 2010, verb="founded"),
        num("Enrollment", INTEGER, 150, 4000),
        txt("Nickname", pick(*MASCOTS)),
        txt("Conference", form("{c} Valley")),
        txt("Type", pick("Public", "Private", "Charter")),
    )),
    Domain("ships", "ship", "ships", "Ship", False, (
        txt("Ship", form("SS {c}")),
        txt("Builder", form("{s} Shipyards")),
        ColumnSpec("Launched", DATE, verb="launched"),
        num("Tonnage (GRT)", INTEGER, 500, 60000, phrase="tonnage"),
        txt("Fate", pick("Sunk", "Scrapped", "Museum ship", "Wrecked", "In service")),
        txt("Pennant No.", form("D {d}{d}"), phrase="pennant number"),
    )),
    Domain("songs", "song", "songs", "Song", False, (
        txt("Song", title),
        txt("Artist", person),
        txt("Album", title),
        num("Year", YEAR, 1960, 2023, verb="released"),
        num("Chart peak", INTEGER, 1, 100, summable=False),
        num("Weeks on chart", INTEGER, 1, 60, phrase="weeks on the chart", counted=True),
    )),
    Domain("cities", "city", "cities", "City", False, (
        txt("City", pick(*CITIES)),
        txt("Country", pick(*COUNTRIES)),
        num("Pop. (2010)", INTEGER, 5000, 4000000, phrase="population in 2010"),
        num("Area (km2)", FLOAT, 10, 3000, phrase="area"),
        num("Elevation (m)", INTEGER, 0, 2500, phrase="elevation"),
        txt("Mayor", person),
    )),
    Domain("episodes", "episode", "episodes", "Title", False, (
        num("No. in series", INTEGER, 1, 200, phrase="number in series", summable=False),
        num("No. in season", INTEGER, 1, 26, phrase="number in season", summable=False),
        txt("Title", title),
        txt("Directed by", person, phrase="director"),
        txt("Written by", person, phrase="writer"),
        ColumnSpec("Original air date", DATE, phrase="air date", verb="first aired"),
        num("U.S. viewers (millions)", FLOAT, 1, 30, phrase="u.s. viewers"),
    )),
    Domain("races", "race", "races", "Race Name", False, (
        num("Rd.", INTEGER, 1, 22, phrase="round", summable=False),
        txt("Race Name", form("{n} Grand Prix"), phrase="race"),
        txt("Circuit", form("{c} Circuit")),
        ColumnSpec("Date", DATE),
        txt("Pole Position", person),
        txt("Winning driver", person),
        txt("Winning team", form("{s} Racing")),
    )),
    Domain("medals", "nation", "nations", "Nation", False, (
        num("Rank", INTEGER, 1, 40, summable=False),
        txt("Nation", pick(*COUNTRIES)),
        num("Gold", INTEGER, 0, 40, counted=True),
        num("Silver", INTEGER, 0, 40, counted=True),
        num("Bronze", INTEGER, 0, 40, counted=True),
        num("Total", INTEGER, 1, 110),
    )),
    Domain("books", "book", "books", "Title", False, (
        txt("Title", title),
        txt("Author", person),
        txt("Publisher", form("{s} Press")),
        num("Year", YEAR, 1900, 2023, verb="published"),
        num("Pages", INTEGER, 90, 1200, counted=True),
        num("Copies sold (millions)", FLOAT, 0, 60, phrase="copies sold"),
    )),
    Domain("companies", "company", "companies", "Company", False, (
        txt("Company", form("{s} {o} Group")),
        txt("Headquarters", pick(*CITIES)),
        txt("Industry", pick("Banking", "Retail", "Energy", "Software", "Mining", "Shipping")),
        num("Revenue (billion $)", FLOAT, 0, 400, phrase="revenue"),
        num("Employees", INTEGER, 50, 300000, counted=True),
        num("Founded", YEAR, 1850, 2020, verb="founded"),
        txt("CEO", person, phrase="ceo"),
    )),
    Domain("mountains", "peak", "peaks", "Peak", False, (
        txt("Peak", form("Mount {s}")),
        txt("Country", pick(*COUNTRIES)),
        txt("Range", form("{a} Range")),
        num("Elevation (m)", INTEGER, 800, 8800, phrase="elevation"),
        num("Prominence (m)", INTEGER, 100, 4000, phrase="prominence"),
        num("First ascent", YEAR, 1780, 2010, verb="first climbed"),
    )),
)
# fmt: on
