"""The open vocabulary of the schema-reading corpus: topic words, names, places, made-up words.

Only data and the split live here; `columns.py` builds column names, table ids and values from
it. A word is held out by a hash of its spelling (not its place in a list), so adding words to a
topic never moves another word between the training and held-out parts.
"""

from __future__ import annotations

import hashlib
import random
import re

# Content words for column names and text values, by topic. Space-separated; "_" joins the
# words of one entry ("home_team" is the entry "home team").
TOPICS: dict[str, str] = {
    "sports": """player team season league club coach goals points assists rebounds wins losses
        draws games matches played round pick position nationality opponent score result venue
        attendance record home away tournament championship title medal rank seed set tie
        fastest_lap pole_position race winner runner-up driver constructor laps grid time
        retired innings runs wickets overs batting bowling average strike rate caps debut
        transfer fee loan goalkeeper defender midfielder forward captain manager referee stadium
        capacity kickoff half quarter period overtime penalty yards touchdowns sacks tackles
        interceptions passes carries receptions catches blocks steals fouls minutes starts
        appearances ties bye week playoff division conference franchise roster draft college
        high_school school/club_team jersey height weight age birthplace hometown country
        events heat lane split finish podium margin handicap purse earnings prize money cuts
        par strokes hole course surface court clay grass hard partner doubles singles mixed
        points_for points_against goal_difference tries conversions bonus ppg rpg apg""",
    "politics": """district incumbent party elected candidates votes vote share majority
        seat seats constituency ward riding election turnout first_elected result status
        senator representative governor mayor president minister cabinet portfolio term
        office state province region county municipality parliament assembly council
        coalition opposition caucus ballot referendum poll swing electorate registered
        delegates nominee running_mate prime_minister speaker chairman secretary deputy
        ambassador embassy treaty bill act law motion amendment committee hearing session""",
    "music": """artist album single song track title label genre producer songwriter composer
        lyricist band singer vocalist guitarist drummer bassist pianist orchestra conductor
        release chart peak position weeks certification sales copies tour concert venue
        setlist encore opener headliner festival stage duration length tempo key bpm format
        vinyl cassette download streams plays debut_album b-side remix featuring
        performer contestant judge audition week_# theme original_artist order""",
    "film": """film movie director writer screenplay cast actor actress role character studio
        distributor budget gross box_office opening weekend runtime rating premiere
        festival award nomination category ceremony year_of_ceremony language subtitles
        episode series season showrunner network channel broadcast airdate air_date
        viewers share ratings timeslot production_code no._in_series no._in_season
        directed_by written_by original_air_date u.s._viewers sequel remake franchise""",
    "science": """element symbol atomic_number mass density melting_point boiling_point
        isotope half-life discovery discoverer species genus family order class phylum
        habitat diet lifespan wingspan population status conservation planet moon orbit
        period radius diameter distance magnitude constellation galaxy star comet asteroid
        mission spacecraft launch landing crew payload rocket orbiter probe telescope
        frequency wavelength energy temperature pressure voltage current resistance power
        speed velocity acceleration force volume area depth altitude elevation latitude
        longitude formula compound molecule protein gene enzyme reaction catalyst""",
    "geography": """country capital city town village region state province district county
        population area density elevation river lake mountain peak range island coast
        border neighbour continent ocean sea bay gulf strait valley desert forest park
        climate rainfall sunshine census language currency anthem motto founded mayor
        postcode code timezone gdp per_capita growth rate households income literacy
        township parish borough canton prefecture municipality location site landmark""",
    "business": """company brand product revenue profit loss assets equity shares stock
        price market cap employees headquarters founder ceo industry sector subsidiary
        owner acquisition merger quarter fiscal_year sales units customers stores branches
        outlets franchisees supplier client contract tender bid cost margin dividend tax
        invoice account balance credit debit loan interest fund bond yield currency
        exchange index ranking fortune forbes valuation investors funding round""",
    "transport": """route line station stop terminal platform train locomotive class builder
        built withdrawn operator depot fleet number livery engine gauge service frequency
        journey distance duration airline airport destination flight aircraft registration
        model manufacturer seats range capacity runway hub ship vessel launched
        commissioned decommissioned fate tonnage displacement hull yard port harbour ferry
        bus tram metro subway highway road junction interchange exit toll bridge tunnel
        span length opened closed vehicle car make horsepower torque mpg transmission
        chassis wheelbase top_speed""",
    "education": """school university college campus faculty department dean principal
        students enrollment undergraduates graduates staff tuition endowment ranking motto
        mascot colors nickname affiliation accreditation degree major minor course credits
        semester grade exam score gpa thesis advisor scholarship alumni established
        location type grades district_name""",
    "media": """newspaper magazine publisher editor circulation frequency issue volume
        pages isbn author book novel poem story chapter edition translator illustrator
        cover genre publication published reviews website domain launch visitors
        subscribers followers platform developer game console players engine release_date
        version patch rating pegi esrb host presenter guest segment podcast radio station
        call_sign branding power_(kw) coverage""",
    "food": """dish cuisine ingredient recipe calories fat protein carbohydrates sugar
        fiber sodium serving portion restaurant chef menu price wine grape vintage region
        producer brewery beer style abv ibu coffee tea origin roast flavor spice sauce""",
    "military": """unit regiment battalion division corps army navy air_force rank
        commander battle war campaign front casualties killed wounded missing captured
        date_of_battle strength weapons aircraft tanks artillery decorations medal
        service_number enlisted discharged""",
    "health": """hospital clinic patients beds doctors nurses disease cases deaths
        recovered vaccinated tests symptoms treatment drug dose trial phase outcome
        mortality incidence prevalence age_group sex""",
    "nature": """tree flower plant seed leaf root bloom forest meadow wetland reef coral
        bird fish mammal reptile insect butterfly beetle spider whale dolphin shark eagle owl
        wolf bear fox deer elk bison tiger lion leopard elephant giraffe zebra monkey ape
        snake lizard frog turtle crab shell nest burrow migration breeding clutch eggs litter
        predator prey range_map sighting count_area observer trail summit glacier volcano
        cave waterfall spring canyon cliff dune plateau basin delta estuary lagoon marsh""",
    "history": """dynasty empire kingdom reign monarch emperor king queen prince princess
        heir consort house royal_house coronation abdication succession treaty_of siege
        revolution uprising rebellion colony settlement expedition explorer voyage charter
        founding founder_of capital_city era_name century_bc ruins artifact excavation
        archaeologist museum collection exhibit curator inscription manuscript scroll""",
    "arts": """painting painter sculpture sculptor gallery exhibition canvas medium style
        movement artwork portrait landscape still_life fresco mural photograph photographer
        architect building tower storeys floors height_(m) completed architectural_style
        theatre play playwright opera ballet choreographer dancer performance premiere_date
        musical lyrics libretto soloist ensemble choir quartet symphony concerto sonata""",
    "technology": """software hardware processor cores clock memory storage display battery
        camera sensor resolution pixels screen_size weight_(g) operating_system browser
        protocol port bandwidth latency throughput server client database query index
        algorithm compiler language_version library framework license repository commits
        contributors downloads users rating_(stars) app store launch_price codename chipset
        transistors process_node socket bus_speed cache instructions benchmark""",
    "weather": """temperature high_temp low_temp record_high record_low precipitation snowfall
        humidity wind gust storm hurricane typhoon cyclone tornado category_(saffir) landfall
        damage fatalities pressure_(hpa) sunshine_hours rainy_days frost_days dew_point""",
    "law": """case court judge justice plaintiff defendant verdict ruling appeal sentence
        charge offence fine prison bail jury lawyer attorney prosecutor docket citation
        statute jurisdiction decided argued majority_opinion dissent""",
    "religion": """church cathedral diocese parish bishop priest denomination congregation
        temple mosque synagogue monastery abbey order_of saint feast pilgrimage shrine""",
    "games": """game player_count board cards dice chess opening move rating elo grandmaster
        tournament_wins puzzle level stage boss score_multiplier lives character_class
        weapon armor quest map mode multiplayer developer_studio publisher_name""",
    "agriculture": """crop harvest yield_(t/ha) acreage farm farmer livestock cattle sheep
        pigs poultry dairy milk wheat maize rice barley soybean cotton coffee_beans cocoa
        irrigation fertilizer tractor orchard vineyard""",
    "misc": """name names notes comments remarks description type kind category class group
        total count amount number id code reference source year date day month
        season week time period era decade century order rank position level tier grade
        status state condition result outcome winner loser champion nominee recipient
        first last previous next new old current former original final start end began
        ended from to until since began_in left joined replaced successor predecessor
        title subject topic sign colour color size shape material value quantity share
        percentage ratio estimate minimum maximum low high best worst top bottom""",
}

# Connector words that column names and questions use around the topic words.
CONNECTORS = ("of", "in", "per", "for", "at", "by", "to", "on", "vs", "&")
UNITS = (
    "m", "km", "ft", "kg", "lb", "%", "$", "€", "£", "km²", "mi²", "kw", "mph", "km/h", "s",
    "min", "mm", "cm", "usd", "millions", "thousands", "est.", "2010", "2011", "1990", "2000",
    "metres", "feet", "hours", "days", "total",
)  # fmt: skip

FIRST_NAMES = """james john robert michael william david richard joseph thomas charles daniel
    matthew anthony mark paul steven andrew kenneth joshua kevin brian george timothy ronald
    mary patricia jennifer linda elizabeth barbara susan jessica sarah karen lisa nancy betty
    margaret sandra ashley emily donna michelle carol amanda melissa deborah stephanie rebecca
    laura sharon cynthia kathleen amy angela anna brenda pamela emma nicole helen samantha
    katherine christine debra rachel carolyn janet maria heather diane julie joyce victoria
    ahmed mohamed ali omar yusuf fatima aisha leila hiroshi yuki kenji akira mei wei li chen
    jun min-jun seo-yeon raj priya arjun ananya ivan olga dmitri sergei natasha pierre jean
    marie luc camille hans klaus greta lars sven ingrid giovanni marco giulia luca sofia
    pablo carlos lucia diego javier jose ana miguel joao pedro thiago kwame kofi ama chidi
    ngozi tariq zainab bjorn astrid nils jan piotr marta tomasz andrzej aleksandar milan
    dragan jelena goran terrence demar kyle jonas nikola luka zoran vince""".split()
LAST_NAMES = """smith johnson williams brown jones garcia miller davis rodriguez martinez
    hernandez lopez gonzalez wilson anderson thomas taylor moore jackson martin lee perez
    thompson white harris sanchez clark ramirez lewis robinson walker young allen king
    wright scott torres nguyen hill flores green adams nelson baker hall rivera campbell
    mitchell carter roberts o'brien o'neal mcdonald macleod van_der_berg de_la_cruz
    dubois lefebvre moreau muller schmidt schneider fischer weber rossi russo ferrari
    esposito bianchi romano tanaka suzuki takahashi watanabe sato kim park choi wang zhang
    liu chen yang huang patel shah kumar singh gupta ivanov petrov smirnov novak kowalski
    nowak horvath nagy kovacs jensen hansen nielsen larsen andersson johansson karlsson
    okafor mensah adeyemi diallo traore haddad khalil nasser cohen levi friedman santos
    oliveira souza pereira costa silva radojevic djordjevic popovic ross curtain anneck
    mcgrady hughes walsh byrne murphy kelly doyle""".split()
PLACES = """london paris berlin madrid rome lisbon dublin oslo stockholm helsinki warsaw
    prague vienna budapest athens istanbul cairo lagos nairobi accra johannesburg cape_town
    mumbai delhi karachi dhaka bangkok jakarta manila tokyo osaka seoul beijing shanghai
    sydney melbourne perth auckland toronto montreal vancouver quebec chicago boston
    new_york los_angeles san_francisco seattle denver dallas houston miami atlanta phoenix
    detroit portland nashville memphis orlando tampa buenos_aires sao_paulo rio_de_janeiro
    lima bogota santiago caracas mexico_city havana kingston reykjavik edinburgh glasgow
    cardiff belfast leeds manchester liverpool birmingham bristol lyon marseille nice
    toulouse munich hamburg cologne frankfurt milan turin naples florence barcelona
    valencia seville porto zurich geneva brussels antwerp amsterdam rotterdam copenhagen
    bergen gothenburg krakow gdansk riga tallinn vilnius kyiv minsk tbilisi yerevan baku
    assen misano monza silverstone suzuka sherbrooke thunder_bay new_jersey washington
    south_australia new_south_wales queensland ontario alberta texas ohio florida""".split()
COUNTRIES = """canada united_states mexico brazil argentina chile peru colombia venezuela
    cuba jamaica united_kingdom ireland france germany spain portugal italy netherlands
    belgium switzerland austria poland czech_republic hungary greece turkey russia ukraine
    sweden norway denmark finland iceland serbia croatia slovenia bosnia lithuania latvia
    estonia egypt nigeria ghana kenya ethiopia south_africa morocco algeria india pakistan
    bangladesh china japan south_korea vietnam thailand indonesia philippines australia
    new_zealand iran iraq israel saudi_arabia qatar""".split()

# Made-up words: pseudo-words read like names and topic words the model can only copy.
_ONSETS = (
    "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
    "br", "ch", "cl", "dr", "gr", "kr", "pl", "sh", "st", "tr", "th", "qu", "",
)  # fmt: skip
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ea", "ou", "y", "ie")
_CODAS = ("", "", "", "", "n", "r", "s", "l", "t", "k", "m", "nd", "rt", "st", "x", "ng")
RESERVED = {"and", "select", "from", "where", "count", "max", "min", "sum", "avg", "a", "q"}


def pseudo_word(rng: random.Random) -> str:
    """A pronounceable made-up word in lower case, such as "kelmora"."""
    while True:
        word = "".join(
            rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
            for _ in range(rng.choice((1, 2, 2, 3)))
        )
        if len(word) >= 3 and word not in RESERVED:
            return word


def _entries(text: str) -> list[str]:
    return [w.replace("_", " ") for w in text.split()]


def _held_out(word: str, fraction: float) -> bool:
    digest = hashlib.sha256(f"held-out:{word}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def topic_words() -> list[str]:
    """Every topic entry once, in a fixed order."""
    seen: dict[str, None] = {}
    for text in TOPICS.values():
        for entry in _entries(text):
            seen.setdefault(entry, None)
    return list(seen)


def split_words(words: list[str], held_out_fraction: float, held_out: bool) -> list[str]:
    """The training part (`held_out` False) or the held-out part of `words`.

    Each word of an entry is drawn in or out on its own, and an entry with any held-out word
    is held out: "power (kw)" cannot carry a held-out "power" into training.
    """
    return [
        entry
        for entry in words
        if any(_held_out(w, held_out_fraction) for w in re.split(r"[ /]", entry)) == held_out
    ]


def names(text_list: list[str]) -> list[str]:
    return [w.replace("_", " ") for w in text_list]
