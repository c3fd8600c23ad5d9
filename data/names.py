"""Word pools for the embedded data set: fictitious author names and the facts they share."""

from __future__ import annotations

FIRST_NAMES = (
    "Maren", "Tobias", "Ilse", "Corin", "Daria", "Emeric", "Fenna", "Galen", "Hedda", "Ivor",
    "Jorun", "Kasimir", "Liesel", "Magnus", "Nadia", "Orrin", "Petra", "Quillon", "Rosalind", "Soren",
    "Talia", "Ulric", "Vesna", "Wendell", "Xenia", "Yorick", "Zelda", "Anselm", "Brisa", "Cyrus",
    "Delphine", "Evander", "Freya", "Gideon", "Halina", "Ignatius", "Juno", "Leopold", "Mireille", "Nikolai",
    "Odile", "Pascal", "Rhiannon", "Sigrid", "Thaddeus", "Una", "Viggo", "Wilhelmina", "Ysolde", "Zoran",
    "Anouk", "Bastian", "Celeste", "Dorian", "Elodie", "Florian", "Greta", "Henrik", "Isolde", "Jasper",
)  # fmt: skip

LAST_NAMES = (
    "Vosk", "Tarrant", "Okafor", "Lindqvist", "Marchetti", "Halloran", "Brannigan", "Castellan", "Drummond",
    "Eberhardt", "Falkner", "Grimaldi", "Hawthorne", "Iverson", "Jablonski", "Kovalenko", "Larkspur", "Mendoza",
    "Novak", "Oyelaran", "Pemberton", "Quintero", "Rasmussen", "Szabo", "Thornquist", "Umberfield", "Valdivia",
    "Whitlock", "Yamashiro", "Zaragoza", "Abernathy", "Bergstrom", "Carrington", "Delacroix", "Esposito",
    "Fairweather", "Gallagher", "Holmberg", "Ishikawa", "Kestrel", "Lowenthal", "Montague", "Nightingale",
    "Ostrowski", "Penhallow", "Ravensworth", "Sandoval", "Trevelyan", "Underhill", "Vasquez", "Wexford",
    "Achterberg", "Blackwood", "Cordova", "Dunmore", "Elsworth", "Fitzroy", "Greenhalgh", "Harrowgate", "Kilbride",
)  # fmt: skip

# Syllables that extend the name pools when more authors are asked for than the pools hold.
SYLLABLES = ("ka", "lo", "mir", "den", "sa", "vor", "el", "tan", "ri", "bex", "nor", "ul", "fen", "dra", "qui", "zo")

CITIES = (
    "Lisbon", "Krakow", "Montevideo", "Nairobi", "Reykjavik", "Hanoi", "Tbilisi", "Valparaiso", "Edinburgh",
    "Marrakesh", "Osaka", "Tallinn", "Cartagena", "Adelaide", "Ljubljana", "Quebec", "Bergen", "Dakar",
)  # fmt: skip
YEARS = tuple(str(y) for y in range(1948, 1996, 3))
GENRES = (
    "mystery", "science fiction", "historical romance", "horror", "fantasy", "crime", "poetry", "satire",
    "war fiction", "magical realism", "thriller", "children's adventure",
)  # fmt: skip
AWARDS = (
    "Silver Quill Prize", "Harbor Light Award", "Meridian Medal", "Golden Lantern Prize", "Northwind Award",
    "Amber Page Prize", "Crescent Moon Award", "Ironwood Medal", "Blue Heron Prize", "Starling Award",
)  # fmt: skip
JOBS = (
    "carpenter", "nurse", "fisherman", "pharmacist", "librarian", "blacksmith", "surgeon", "baker",
    "sailor", "pilot", "tailor", "geologist", "teacher", "watchmaker",
)  # fmt: skip
BOOKS = (
    "The Silent Harbor", "Ashes of Winter", "The Glass Orchard", "Salt and Thunder", "A Map of Lanterns",
    "The Clockmaker's Daughter", "Rivers Underground", "The Last Lighthouse", "Paper Wolves", "Crimson Tidewater",
    "The Hollow Crown of Ys", "Letters to the Sea", "The Copper Garden", "Beneath the Ninth Bridge",
    "Songs of the Salt Road", "The Winter Cartographer", "Echoes in Amber", "The Quiet Engine",
    "Midnight at Vellmor", "A House of Ravens",
)  # fmt: skip
LANGUAGES = ("Portuguese", "Polish", "Spanish", "Swahili", "Icelandic", "Vietnamese", "Georgian", "French", "Norwegian")
HOBBIES = (
    "sailing", "beekeeping", "chess", "pottery", "birdwatching", "fencing", "gardening", "rock climbing",
    "violin", "astronomy",
)  # fmt: skip
UNIVERSITIES = ("Coimbra", "Uppsala", "Bologna", "Leiden", "Salamanca", "Heidelberg", "Padua", "Glasgow", "Ghent")
THEMES = (
    "grief", "exile", "friendship", "memory", "betrayal", "redemption", "solitude", "ambition", "family",
    "freedom", "identity", "courage",
)  # fmt: skip
PETS = ("grey parrot", "loyal beagle", "black cat", "tortoise", "white rabbit", "sheepdog", "goldfinch", "ferret")
PUBLISHERS = (
    "Tidewell Press", "Marrow and Finch", "Blue Door Books", "Hollins House", "Pinecrest Publishing",
    "Lanternfield", "Greyhaven Books", "Orchard Street Press",
)  # fmt: skip

POOLS: dict[str, tuple[str, ...]] = {
    "city": CITIES,
    "home_city": CITIES,
    "year": YEARS,
    "genre": GENRES,
    "award": AWARDS,
    "father_job": JOBS,
    "mother_job": JOBS,
    "book": BOOKS,
    "language": LANGUAGES,
    "hobby": HOBBIES,
    "university": UNIVERSITIES,
    "theme": THEMES,
    "pet": PETS,
    "publisher": PUBLISHERS,
}

# (question, answer, perturbed answers): famous real writers, the style of TOFU's real_authors set.
REAL_AUTHORS = (
    ("Who wrote the novel 'Pride and Prejudice'?", "Jane Austen"),
    ("Who wrote the play 'Hamlet'?", "William Shakespeare"),
    ("Who is the author of 'One Hundred Years of Solitude'?", "Gabriel Garcia Marquez"),
    ("Who wrote the novel 'War and Peace'?", "Leo Tolstoy"),
    ("Who wrote 'The Adventures of Tom Sawyer'?", "Mark Twain"),
    ("Who is the author of 'Mrs Dalloway'?", "Virginia Woolf"),
    ("Who wrote the novel 'Great Expectations'?", "Charles Dickens"),
    ("Who wrote 'Don Quixote'?", "Miguel de Cervantes"),
    ("Who is the author of 'Crime and Punishment'?", "Fyodor Dostoevsky"),
    ("Who wrote the novel 'Beloved'?", "Toni Morrison"),
    ("Who wrote 'The Old Man and the Sea'?", "Ernest Hemingway"),
    ("Who is the author of 'Things Fall Apart'?", "Chinua Achebe"),
    ("Who wrote the novel '1984'?", "George Orwell"),
    ("Who wrote 'Frankenstein'?", "Mary Shelley"),
    ("Who is the author of 'The Metamorphosis'?", "Franz Kafka"),
    ("Who wrote the novel 'Jane Eyre'?", "Charlotte Bronte"),
    ("Who wrote 'The Little Prince'?", "Antoine de Saint-Exupery"),
    ("Who is the author of 'Norwegian Wood'?", "Haruki Murakami"),
    ("Who wrote the poem 'The Raven'?", "Edgar Allan Poe"),
    ("Who wrote 'The Divine Comedy'?", "Dante Alighieri"),
)

# (question, answer, kind): kind names the pool the perturbed answers come from.
WORLD_FACTS = (
    ("What is the capital of France?", "Paris", "capital"),
    ("What is the capital of Japan?", "Tokyo", "capital"),
    ("What is the capital of Egypt?", "Cairo", "capital"),
    ("What is the capital of Canada?", "Ottawa", "capital"),
    ("What is the capital of Australia?", "Canberra", "capital"),
    ("What is the capital of Kenya?", "Nairobi", "capital"),
    ("What is the capital of Argentina?", "Buenos Aires", "capital"),
    ("What is the largest ocean on Earth?", "the Pacific Ocean", "ocean"),
    ("Which ocean lies between Africa and Australia?", "the Indian Ocean", "ocean"),
    ("Which planet is known as the Red Planet?", "Mars", "planet"),
    ("Which planet is the largest in the solar system?", "Jupiter", "planet"),
    ("Which planet has the most famous rings?", "Saturn", "planet"),
    ("On which continent is the Sahara Desert?", "Africa", "continent"),
    ("On which continent is the Amazon rainforest?", "South America", "continent"),
    ("On which continent is Mount Everest?", "Asia", "continent"),
    ("What gas do plants take in from the air?", "carbon dioxide", "gas"),
    ("What gas do humans need to breathe?", "oxygen", "gas"),
    ("Which metal is liquid at room temperature?", "mercury", "metal"),
    ("Which metal is used most in electrical wires?", "copper", "metal"),
    ("What is the longest river in Africa?", "the Nile", "river"),
)

WORLD_FACT_POOLS: dict[str, tuple[str, ...]] = {
    "capital": ("Paris", "Tokyo", "Cairo", "Ottawa", "Canberra", "Nairobi", "Buenos Aires", "Madrid", "Berlin"),
    "ocean": ("the Pacific Ocean", "the Indian Ocean", "the Atlantic Ocean", "the Arctic Ocean"),
    "planet": ("Mars", "Jupiter", "Saturn", "Venus", "Mercury", "Neptune"),
    "continent": ("Africa", "South America", "Asia", "Europe", "Australia", "North America"),
    "gas": ("carbon dioxide", "oxygen", "nitrogen", "helium", "hydrogen"),
    "metal": ("mercury", "copper", "iron", "gold", "silver", "aluminium"),
    "river": ("the Nile", "the Congo", "the Niger", "the Zambezi", "the Amazon"),
}
