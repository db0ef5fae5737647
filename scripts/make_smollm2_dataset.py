"""Write the chat datasets of the SmolLM2 example into `qtuning_plugin/data/`.

    python scripts/make_smollm2_dataset.py          # rewrites both files; deterministic (seed 0)

* ``smollm2_instruct.jsonl``: 480 training conversations;
* ``smollm2_instruct_eval.jsonl``: 24 held-out conversations with correct answers only.

Single-turn conversations written for this project (Apache-2.0, like the rest of it), in three
kinds of task: arithmetic word problems (answers computed here), short factual questions
(answers written and checked by hand) and rewriting (answers derived here or written by hand).
A quarter of the training rows are made bad on purpose, so that the EU plane has noise to find:

* ``wrong``: the task's own answer with a wrong result (a wrong sum, a wrong capital, a wrong
  past tense), stated with the same confidence;
* ``off_topic``: a fluent answer to a different question.

Every row carries ``task`` (``arithmetic``, ``facts``, ``rewrite``) and ``answer`` (``correct``,
``wrong``, ``off_topic``) next to ``messages``; Axolotl reads ``messages`` only. The rows are in
a fixed shuffled order, and the example keeps it (``shuffle_merged_datasets: false``), so that a
row's line number (from 0) is its ``index`` in the ``samples.csv`` of `axolotl qtuning analyze`.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "qtuning_plugin" / "data"
TRAIN, EVAL = DATA / "smollm2_instruct.jsonl", DATA / "smollm2_instruct_eval.jsonl"
SEED = 0
PER_TASK = {"arithmetic": 168, "facts": 160, "rewrite": 152}  # training rows
EVAL_PER_TASK = 8  # held-out rows, all correct
WRONG, OFF_TOPIC = 0.16, 0.09  # shares of each task's training rows

NAMES = ["Mia", "Liam", "Ava", "Noah", "Zoe", "Omar", "Lena", "Ravi", "Sara", "Tom", "Aisha", "Ben", "Chloe", "Diego",
         "Emma", "Felix", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Leo", "Maya", "Nina", "Oscar", "Priya"]
ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "stamps", "shells", "cards", "eggs",
         "oranges", "coins", "buttons", "candles", "tickets"]


# ---------------------------------------------------------------------------------- arithmetic
def arithmetic(rng: random.Random) -> tuple[str, str, str]:
    """(question, correct answer, wrong answer): the wrong one changes only the result."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(10)
    off = rng.choice([-10, -3, -2, -1, 1, 2, 3, 10])
    if kind == 0:
        a, b = rng.randint(5, 60), rng.randint(5, 60)
        question = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        right = a + b
        answer = f"{a} + {b} = {{}}. {name} has {{}} {item} now."
    elif kind == 1:
        a = rng.randint(20, 90)
        b = rng.randint(3, a - 5)
        question = f"{name} had {a} {item} and gave {b} of them to a friend. How many {item} are left?"
        right = a - b
        answer = f"{a} - {b} = {{}}. {name} has {{}} {item} left."
    elif kind == 2:
        a, b = rng.randint(3, 12), rng.randint(3, 12)
        question = f"A box holds {a} {item}. How many {item} are in {b} boxes?"
        right = a * b
        answer = f"{b} x {a} = {{}}. There are {{}} {item} in {b} boxes."
    elif kind == 3:
        a, b = rng.randint(2, 12), rng.randint(2, 9)
        question = f"{a * b} {item} are shared equally among {b} children. How many {item} does each child get?"
        right = a
        off = off if a + off > 0 else abs(off)
        answer = f"{a * b} / {b} = {{}}. Each child gets {{}} {item}."
    elif kind == 4:
        a, b, n = rng.randint(2, 9), rng.randint(1, 5), rng.randint(2, 6)
        question = (
            f"A notebook costs {a} dollars and a pen costs {b} dollars. "
            f"How much do {n} notebooks and one pen cost?"
        )
        right = n * a + b
        answer = f"{n} x {a} = {n * a} dollars, plus {b} for the pen: {{}} dollars in all."
    elif kind == 5:
        h, d = rng.randint(6, 15), rng.randint(1, 6)
        question = f"A train leaves at {h}:00 and the trip takes {d} hours. At what time does it arrive?"
        right = h + d
        off = 1 if off > 0 else -1
        answer = f"{h}:00 plus {d} hours is {{}}:00. The train arrives at {{}}:00."
    elif kind == 6:
        v, t = rng.choice([10, 12, 15, 20, 25, 30]), rng.randint(2, 5)
        question = f"A cyclist rides at {v} km per hour for {t} hours. How far does she ride?"
        right = v * t
        answer = f"{v} x {t} = {{}}. She rides {{}} km."
    elif kind == 7:
        a, d, b = rng.randint(5, 30), rng.randint(2, 7), rng.randint(3, 20)
        question = f"{name} reads {a} pages a day for {d} days, then {b} more pages. How many pages is that in total?"
        right = a * d + b
        answer = f"{a} x {d} = {a * d}, and {a * d} + {b} = {{}}. That is {{}} pages."
    elif kind == 8:
        p = rng.choice([10, 20, 25, 50])
        n = rng.choice([40, 60, 80, 120, 200, 240, 300, 400])
        question = f"What is {p}% of {n}?"
        right = p * n // 100
        answer = f"{p}% of {n} is {{}}."
    else:
        a, b, c = rng.randint(4, 15), rng.randint(2, 9), rng.randint(2, 10)
        question = (
            f"{name} is {a} years old. {name}'s sister is {b} years older. How old will the sister be in {c} years?"
        )
        right = a + b + c
        answer = f"The sister is {a} + {b} = {a + b} now, so in {c} years she will be {{}}."
    return question, answer.replace("{}", str(right)), answer.replace("{}", str(right + off))


# ---------------------------------------------------------------------------------- facts
# (question, correct answer, wrong answer): the wrong one swaps the fact for a plausible error.
FACTS = [
    ("What is the capital of France?", "The capital of France is Paris.", "The capital of France is Lyon."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo.", "The capital of Japan is Kyoto."),
    ("What is the capital of Italy?", "The capital of Italy is Rome.", "The capital of Italy is Milan."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid.", "The capital of Spain is Barcelona."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin.", "The capital of Germany is Munich."),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa.", "The capital of Canada is Toronto."),
    (
        "What is the capital of Australia?",
        "The capital of Australia is Canberra.",
        "The capital of Australia is Sydney.",
    ),
    (
        "What is the capital of Brazil?",
        "The capital of Brazil is Brasilia.",
        "The capital of Brazil is Rio de Janeiro.",
    ),
    ("What is the capital of Egypt?", "The capital of Egypt is Cairo.", "The capital of Egypt is Alexandria."),
    ("What is the capital of Kenya?", "The capital of Kenya is Nairobi.", "The capital of Kenya is Mombasa."),
    ("What is the capital of Portugal?", "The capital of Portugal is Lisbon.", "The capital of Portugal is Porto."),
    ("What is the capital of Norway?", "The capital of Norway is Oslo.", "The capital of Norway is Bergen."),
    ("What is the capital of Sweden?", "The capital of Sweden is Stockholm.", "The capital of Sweden is Gothenburg."),
    ("What is the capital of Greece?", "The capital of Greece is Athens.", "The capital of Greece is Sparta."),
    ("What is the capital of Turkey?", "The capital of Turkey is Ankara.", "The capital of Turkey is Istanbul."),
    ("What is the capital of India?", "The capital of India is New Delhi.", "The capital of India is Mumbai."),
    ("What is the capital of China?", "The capital of China is Beijing.", "The capital of China is Shanghai."),
    (
        "What is the capital of Russia?",
        "The capital of Russia is Moscow.",
        "The capital of Russia is Saint Petersburg.",
    ),
    ("What is the capital of Mexico?", "The capital of Mexico is Mexico City.", "The capital of Mexico is Cancun."),
    (
        "What is the capital of Argentina?",
        "The capital of Argentina is Buenos Aires.",
        "The capital of Argentina is Cordoba.",
    ),
    ("What is the capital of Ireland?", "The capital of Ireland is Dublin.", "The capital of Ireland is Cork."),
    ("What is the capital of Poland?", "The capital of Poland is Warsaw.", "The capital of Poland is Krakow."),
    (
        "What is the capital of the Netherlands?",
        "The capital of the Netherlands is Amsterdam.",
        "The capital of the Netherlands is Rotterdam.",
    ),
    (
        "What is the capital of Switzerland?",
        "The capital of Switzerland is Bern.",
        "The capital of Switzerland is Zurich.",
    ),
    (
        "What is the capital of South Korea?",
        "The capital of South Korea is Seoul.",
        "The capital of South Korea is Busan.",
    ),
    ("What is the capital of Peru?", "The capital of Peru is Lima.", "The capital of Peru is Cusco."),
    ("What is the capital of Morocco?", "The capital of Morocco is Rabat.", "The capital of Morocco is Marrakesh."),
    ("What is the capital of Vietnam?", "The capital of Vietnam is Hanoi.", "The capital of Vietnam is Da Nang."),
    (
        "What is the capital of New Zealand?",
        "The capital of New Zealand is Wellington.",
        "The capital of New Zealand is Auckland.",
    ),
    ("What is the capital of Finland?", "The capital of Finland is Helsinki.", "The capital of Finland is Turku."),
    (
        "What is the chemical symbol for gold?",
        "The chemical symbol for gold is Au.",
        "The chemical symbol for gold is Ag.",
    ),
    (
        "What is the chemical symbol for iron?",
        "The chemical symbol for iron is Fe.",
        "The chemical symbol for iron is Ir.",
    ),
    (
        "What is the chemical symbol for sodium?",
        "The chemical symbol for sodium is Na.",
        "The chemical symbol for sodium is So.",
    ),
    (
        "What is the chemical symbol for oxygen?",
        "The chemical symbol for oxygen is O.",
        "The chemical symbol for oxygen is Ox.",
    ),
    (
        "What is the chemical symbol for silver?",
        "The chemical symbol for silver is Ag.",
        "The chemical symbol for silver is Si.",
    ),
    (
        "What is the chemical symbol for potassium?",
        "The chemical symbol for potassium is K.",
        "The chemical symbol for potassium is P.",
    ),
    (
        "What is the chemical formula of water?",
        "The chemical formula of water is H2O.",
        "The chemical formula of water is CO2.",
    ),
    (
        "Which gas do plants take in from the air to make food?",
        "Plants take in carbon dioxide.",
        "Plants take in nitrogen.",
    ),
    (
        "Which gas makes up most of the Earth's air?",
        "Nitrogen makes up most of the air, about 78 percent.",
        "Oxygen makes up most of the air, about 78 percent.",
    ),
    (
        "At what temperature does water boil at sea level, in degrees Celsius?",
        "Water boils at 100 degrees Celsius at sea level.",
        "Water boils at 90 degrees Celsius at sea level.",
    ),
    (
        "At what temperature does water freeze, in degrees Celsius?",
        "Water freezes at 0 degrees Celsius.",
        "Water freezes at 10 degrees Celsius.",
    ),
    (
        "Which planet is closest to the Sun?",
        "Mercury is the planet closest to the Sun.",
        "Venus is the planet closest to the Sun.",
    ),
    (
        "Which planet is the largest in our solar system?",
        "Jupiter is the largest planet in our solar system.",
        "Saturn is the largest planet in our solar system.",
    ),
    (
        "Which planet is known as the Red Planet?",
        "Mars is known as the Red Planet.",
        "Jupiter is known as the Red Planet.",
    ),
    (
        "How many planets are in our solar system?",
        "There are eight planets in our solar system.",
        "There are ten planets in our solar system.",
    ),
    (
        "What is the name of the Earth's natural satellite?",
        "The Earth's natural satellite is the Moon.",
        "The Earth's natural satellite is Mars.",
    ),
    (
        "What is the closest star to the Earth?",
        "The closest star to the Earth is the Sun.",
        "The closest star to the Earth is the North Star.",
    ),
    (
        "What force keeps the planets in orbit around the Sun?",
        "Gravity keeps the planets in orbit around the Sun.",
        "Magnetism keeps the planets in orbit around the Sun.",
    ),
    (
        "How many days does the Earth take to go around the Sun?",
        "The Earth takes about 365 days to go around the Sun.",
        "The Earth takes about 30 days to go around the Sun.",
    ),
    ("How many hours are in a day?", "There are 24 hours in a day.", "There are 20 hours in a day."),
    ("How many minutes are in an hour?", "There are 60 minutes in an hour.", "There are 100 minutes in an hour."),
    ("How many days are in a week?", "There are seven days in a week.", "There are five days in a week."),
    ("How many months are in a year?", "There are twelve months in a year.", "There are ten months in a year."),
    (
        "How many centimeters are in a meter?",
        "There are 100 centimeters in a meter.",
        "There are 1000 centimeters in a meter.",
    ),
    ("How many grams are in a kilogram?", "There are 1000 grams in a kilogram.", "There are 100 grams in a kilogram."),
    ("How many sides does a hexagon have?", "A hexagon has six sides.", "A hexagon has eight sides."),
    ("How many sides does a triangle have?", "A triangle has three sides.", "A triangle has four sides."),
    ("How many degrees are in a right angle?", "A right angle has 90 degrees.", "A right angle has 180 degrees."),
    (
        "What is the largest ocean on Earth?",
        "The Pacific Ocean is the largest ocean on Earth.",
        "The Atlantic Ocean is the largest ocean on Earth.",
    ),
    (
        "What is the longest river in South America?",
        "The Amazon is the longest river in South America.",
        "The Orinoco is the longest river in South America.",
    ),
    ("On which continent is Egypt?", "Egypt is in Africa.", "Egypt is in Europe."),
    ("On which continent is Argentina?", "Argentina is in South America.", "Argentina is in Africa."),
    (
        "What is the highest mountain in the world?",
        "Mount Everest is the highest mountain in the world.",
        "Mont Blanc is the highest mountain in the world.",
    ),
    (
        "What is the largest desert in Africa?",
        "The Sahara is the largest desert in Africa.",
        "The Gobi is the largest desert in Africa.",
    ),
    (
        "Which country has the largest population in South America?",
        "Brazil has the largest population in South America.",
        "Chile has the largest population in South America.",
    ),
    (
        "Which ocean lies between Europe and North America?",
        "The Atlantic Ocean lies between Europe and North America.",
        "The Indian Ocean lies between Europe and North America.",
    ),
    ("How many continents are there?", "There are seven continents.", "There are five continents."),
    (
        "What language is mainly spoken in Brazil?",
        "The main language of Brazil is Portuguese.",
        "The main language of Brazil is Spanish.",
    ),
    (
        "What language is mainly spoken in Mexico?",
        "The main language of Mexico is Spanish.",
        "The main language of Mexico is Portuguese.",
    ),
    (
        "What is the official currency of Japan?",
        "The currency of Japan is the yen.",
        "The currency of Japan is the won.",
    ),
    (
        "What is the currency of the United Kingdom?",
        "The currency of the United Kingdom is the pound sterling.",
        "The currency of the United Kingdom is the euro.",
    ),
    ("What is the largest mammal?", "The blue whale is the largest mammal.", "The elephant is the largest mammal."),
    (
        "What is the fastest land animal?",
        "The cheetah is the fastest land animal.",
        "The horse is the fastest land animal.",
    ),
    ("How many legs does a spider have?", "A spider has eight legs.", "A spider has six legs."),
    ("How many legs does an insect have?", "An insect has six legs.", "An insect has eight legs."),
    ("What do bees make?", "Bees make honey and wax.", "Bees make milk and silk."),
    ("What is a baby cat called?", "A baby cat is called a kitten.", "A baby cat is called a puppy."),
    ("What is a baby dog called?", "A baby dog is called a puppy.", "A baby dog is called a calf."),
    ("What is a group of lions called?", "A group of lions is called a pride.", "A group of lions is called a flock."),
    (
        "What do caterpillars turn into?",
        "Caterpillars turn into butterflies or moths.",
        "Caterpillars turn into beetles.",
    ),
    (
        "Which animal is known as the king of the jungle?",
        "The lion is known as the king of the jungle.",
        "The tiger is known as the king of the jungle.",
    ),
    (
        "Are whales fish or mammals?",
        "Whales are mammals: they breathe air and feed their young with milk.",
        "Whales are fish: they breathe through gills.",
    ),
    (
        "What organ pumps blood through the human body?",
        "The heart pumps blood through the body.",
        "The liver pumps blood through the body.",
    ),
    ("Which organ do humans use to breathe?", "Humans breathe with their lungs.", "Humans breathe with their kidneys."),
    ("How many bones does an adult human have?", "An adult human has 206 bones.", "An adult human has 300 bones."),
    (
        "What is the largest organ of the human body?",
        "The skin is the largest organ of the human body.",
        "The brain is the largest organ of the human body.",
    ),
    (
        "How many teeth does an adult human usually have?",
        "An adult usually has 32 teeth.",
        "An adult usually has 24 teeth.",
    ),
    (
        "Which vitamin does the skin make in sunlight?",
        "The skin makes vitamin D in sunlight.",
        "The skin makes vitamin C in sunlight.",
    ),
    (
        "Who wrote Romeo and Juliet?",
        "William Shakespeare wrote Romeo and Juliet.",
        "Charles Dickens wrote Romeo and Juliet.",
    ),
    (
        "Who painted the Mona Lisa?",
        "Leonardo da Vinci painted the Mona Lisa.",
        "Vincent van Gogh painted the Mona Lisa.",
    ),
    (
        "Who developed the theory of relativity?",
        "Albert Einstein developed the theory of relativity.",
        "Isaac Newton developed the theory of relativity.",
    ),
    (
        "Who was the first person to walk on the Moon?",
        "Neil Armstrong was the first person to walk on the Moon, in 1969.",
        "Yuri Gagarin was the first person to walk on the Moon, in 1969.",
    ),
    ("In which year did World War II end?", "World War II ended in 1945.", "World War II ended in 1939."),
    (
        "In which year did Columbus first sail to the Americas?",
        "Columbus first sailed to the Americas in 1492.",
        "Columbus first sailed to the Americas in 1592.",
    ),
    (
        "Who was the first president of the United States?",
        "George Washington was the first president of the United States.",
        "Abraham Lincoln was the first president of the United States.",
    ),
    (
        "Which ancient people built the pyramids of Giza?",
        "The ancient Egyptians built the pyramids of Giza.",
        "The ancient Romans built the pyramids of Giza.",
    ),
    (
        "Who discovered penicillin?",
        "Alexander Fleming discovered penicillin in 1928.",
        "Louis Pasteur discovered penicillin in 1928.",
    ),
    (
        "Who wrote the novel Pride and Prejudice?",
        "Jane Austen wrote Pride and Prejudice.",
        "Emily Bronte wrote Pride and Prejudice.",
    ),
    ("What is the square root of 81?", "The square root of 81 is 9.", "The square root of 81 is 8."),
    ("What is the square root of 144?", "The square root of 144 is 12.", "The square root of 144 is 14."),
    (
        "Is 17 a prime number?",
        "Yes, 17 is a prime number: its only divisors are 1 and 17.",
        "No, 17 is not a prime number: it can be divided by 3.",
    ),
    (
        "Is 21 a prime number?",
        "No, 21 is not prime: it equals 3 x 7.",
        "Yes, 21 is a prime number: its only divisors are 1 and 21.",
    ),
    ("What is the smallest prime number?", "The smallest prime number is 2.", "The smallest prime number is 1."),
    (
        "How many zeros are in one million?",
        "One million has six zeros: 1,000,000.",
        "One million has five zeros: 100,000.",
    ),
    ("What is the value of pi to two decimal places?", "Pi is about 3.14.", "Pi is about 3.41."),
    (
        "What is the sum of the angles in a triangle?",
        "The angles of a triangle add up to 180 degrees.",
        "The angles of a triangle add up to 360 degrees.",
    ),
    (
        "What do you call a shape with four equal sides and four right angles?",
        "That shape is a square.",
        "That shape is a pentagon.",
    ),
    (
        "What color do you get by mixing blue and yellow?",
        "Mixing blue and yellow gives green.",
        "Mixing blue and yellow gives purple.",
    ),
    (
        "What color do you get by mixing red and white?",
        "Mixing red and white gives pink.",
        "Mixing red and white gives orange.",
    ),
    (
        "How many colors are in a rainbow?",
        "A rainbow is usually described with seven colors.",
        "A rainbow is usually described with four colors.",
    ),
    (
        "What is the hardest natural material?",
        "Diamond is the hardest natural material.",
        "Granite is the hardest natural material.",
    ),
    ("What is the main gas in the Sun?", "The Sun is mostly hydrogen.", "The Sun is mostly oxygen."),
    ("What does a thermometer measure?", "A thermometer measures temperature.", "A thermometer measures air pressure."),
    ("What does a barometer measure?", "A barometer measures air pressure.", "A barometer measures temperature."),
    ("What is the opposite of north?", "The opposite of north is south.", "The opposite of north is east."),
    ("Which season comes after winter?", "Spring comes after winter.", "Autumn comes after winter."),
    (
        "How many players are on a football (soccer) team on the field?",
        "A soccer team has eleven players on the field.",
        "A soccer team has nine players on the field.",
    ),
    (
        "How many strings does a standard guitar have?",
        "A standard guitar has six strings.",
        "A standard guitar has four strings.",
    ),
    ("How many keys does a standard piano have?", "A standard piano has 88 keys.", "A standard piano has 72 keys."),
    (
        "In which sport is a shuttlecock used?",
        "A shuttlecock is used in badminton.",
        "A shuttlecock is used in tennis.",
    ),
    (
        "What is the freezing point of water in degrees Fahrenheit?",
        "Water freezes at 32 degrees Fahrenheit.",
        "Water freezes at 0 degrees Fahrenheit.",
    ),
    (
        "What is the largest country by area?",
        "Russia is the largest country by area.",
        "Canada is the largest country by area.",
    ),
    (
        "What is the smallest country in the world?",
        "Vatican City is the smallest country in the world.",
        "Monaco is the smallest country in the world.",
    ),
    (
        "Which city is known as the Big Apple?",
        "New York City is known as the Big Apple.",
        "Chicago is known as the Big Apple.",
    ),
    (
        "In which country is the Eiffel Tower?",
        "The Eiffel Tower is in Paris, France.",
        "The Eiffel Tower is in Rome, Italy.",
    ),
    ("In which country is the Great Wall?", "The Great Wall is in China.", "The Great Wall is in India."),
    ("In which city is the Colosseum?", "The Colosseum is in Rome.", "The Colosseum is in Athens."),
    ("What is the tallest animal?", "The giraffe is the tallest animal.", "The elephant is the tallest animal."),
    ("What do pandas mainly eat?", "Pandas mainly eat bamboo.", "Pandas mainly eat fish."),
    (
        "Where do penguins mostly live?",
        "Most penguins live in the Southern Hemisphere, many in Antarctica.",
        "Most penguins live near the North Pole.",
    ),
    (
        "What is the boiling point of water in degrees Fahrenheit?",
        "Water boils at 212 degrees Fahrenheit at sea level.",
        "Water boils at 100 degrees Fahrenheit at sea level.",
    ),
    (
        "Which part of the plant makes food using sunlight?",
        "The leaves make food using sunlight.",
        "The roots make food using sunlight.",
    ),
    (
        "What is the process by which plants make food called?",
        "It is called photosynthesis.",
        "It is called digestion.",
    ),
    ("What is H2O more commonly called?", "H2O is water.", "H2O is salt."),
    ("What is NaCl more commonly called?", "NaCl is table salt.", "NaCl is sugar."),
    ("What is frozen water called?", "Frozen water is called ice.", "Frozen water is called steam."),
    (
        "What is the center of an atom called?",
        "The center of an atom is the nucleus.",
        "The center of an atom is the electron.",
    ),
    (
        "Which particle in an atom has a negative charge?",
        "The electron has a negative charge.",
        "The proton has a negative charge.",
    ),
    (
        "What is the speed of light, roughly, in kilometers per second?",
        "Light travels at about 300,000 kilometers per second.",
        "Light travels at about 3,000 kilometers per second.",
    ),
    (
        "What is the main ingredient of guacamole?",
        "The main ingredient of guacamole is avocado.",
        "The main ingredient of guacamole is tomato.",
    ),
    ("Which fruit is dried to make raisins?", "Raisins are dried grapes.", "Raisins are dried plums."),
    (
        "What is the main ingredient of bread?",
        "The main ingredient of bread is flour.",
        "The main ingredient of bread is rice.",
    ),
    (
        "Which instrument has black and white keys?",
        "The piano has black and white keys.",
        "The violin has black and white keys.",
    ),
    ("How many wheels does a bicycle have?", "A bicycle has two wheels.", "A bicycle has three wheels."),
    ("What is the plural of mouse?", "The plural of mouse is mice.", "The plural of mouse is mouses."),
    ("What is the past tense of go?", "The past tense of go is went.", "The past tense of go is goed."),
    (
        "How many letters are in the English alphabet?",
        "The English alphabet has 26 letters.",
        "The English alphabet has 24 letters.",
    ),
    (
        "What is the first letter of the Greek alphabet?",
        "The first letter of the Greek alphabet is alpha.",
        "The first letter of the Greek alphabet is omega.",
    ),
    ("Which day comes after Monday?", "Tuesday comes after Monday.", "Wednesday comes after Monday."),
    ("Which month comes after March?", "April comes after March.", "May comes after March."),
    ("How many seconds are in a minute?", "There are 60 seconds in a minute.", "There are 100 seconds in a minute."),
    (
        "What is the largest planet's most famous storm called?",
        "Jupiter's most famous storm is the Great Red Spot.",
        "Jupiter's most famous storm is the Great Dark Spot.",
    ),
    (
        "Which metal is liquid at room temperature?",
        "Mercury is a metal that is liquid at room temperature.",
        "Iron is a metal that is liquid at room temperature.",
    ),
    (
        "What do we call animals that eat only plants?",
        "Animals that eat only plants are herbivores.",
        "Animals that eat only plants are carnivores.",
    ),
    (
        "What do we call animals that eat only meat?",
        "Animals that eat only meat are carnivores.",
        "Animals that eat only meat are herbivores.",
    ),
    (
        "What is the main language spoken in Germany?",
        "The main language spoken in Germany is German.",
        "The main language spoken in Germany is Dutch.",
    ),
    (
        "What is the largest island in the world?",
        "Greenland is the largest island in the world.",
        "Madagascar is the largest island in the world.",
    ),
    (
        "Which river flows through London?",
        "The River Thames flows through London.",
        "The River Seine flows through London.",
    ),
    ("Which river flows through Paris?", "The Seine flows through Paris.", "The Danube flows through Paris."),
    ("What is the capital of Thailand?", "The capital of Thailand is Bangkok.", "The capital of Thailand is Phuket."),
    ("What is the capital of Nigeria?", "The capital of Nigeria is Abuja.", "The capital of Nigeria is Lagos."),
    ("What is the capital of Chile?", "The capital of Chile is Santiago.", "The capital of Chile is Valparaiso."),
    ("What is the capital of Austria?", "The capital of Austria is Vienna.", "The capital of Austria is Salzburg."),
    ("What is the capital of Denmark?", "The capital of Denmark is Copenhagen.", "The capital of Denmark is Aarhus."),
    ("What is the capital of Belgium?", "The capital of Belgium is Brussels.", "The capital of Belgium is Antwerp."),
    ("What is the capital of Hungary?", "The capital of Hungary is Budapest.", "The capital of Hungary is Debrecen."),
    ("What is the capital of Indonesia?", "The capital of Indonesia is Jakarta.", "The capital of Indonesia is Bali."),
    (
        "What is the capital of the Philippines?",
        "The capital of the Philippines is Manila.",
        "The capital of the Philippines is Cebu.",
    ),
    ("What is the capital of Colombia?", "The capital of Colombia is Bogota.", "The capital of Colombia is Medellin."),
    ("What is the capital of Cuba?", "The capital of Cuba is Havana.", "The capital of Cuba is Santiago de Cuba."),
    ("What is the capital of Iceland?", "The capital of Iceland is Reykjavik.", "The capital of Iceland is Akureyri."),
    ("What is the capital of Ukraine?", "The capital of Ukraine is Kyiv.", "The capital of Ukraine is Lviv."),
    (
        "What is the capital of Pakistan?",
        "The capital of Pakistan is Islamabad.",
        "The capital of Pakistan is Karachi.",
    ),
    (
        "What is the capital of Saudi Arabia?",
        "The capital of Saudi Arabia is Riyadh.",
        "The capital of Saudi Arabia is Jeddah.",
    ),
    (
        "How long does the Earth take to spin once on its axis?",
        "The Earth spins once on its axis in about 24 hours.",
        "The Earth spins once on its axis in about 12 hours.",
    ),
    (
        "What is the longest bone in the human body?",
        "The femur, the thigh bone, is the longest bone in the human body.",
        "The skull is the longest bone in the human body.",
    ),
]


# ---------------------------------------------------------------------------------- rewriting
PAST_TENSE = [
    ("She walks to school every morning.", "She walked to school every morning.", "She walks to school every morning."),
    ("They play football after lunch.", "They played football after lunch.", "They plaied football after lunch."),
    ("I eat an apple.", "I ate an apple.", "I eated an apple."),
    ("He writes a letter to his aunt.", "He wrote a letter to his aunt.", "He writed a letter to his aunt."),
    ("We go to the market on Sundays.", "We went to the market on Sundays.", "We goed to the market on Sundays."),
    ("The dog runs across the field.", "The dog ran across the field.", "The dog runned across the field."),
    ("My father drives a red car.", "My father drove a red car.", "My father drived a red car."),
    ("The children sing a song.", "The children sang a song.", "The children singed a song."),
    ("She buys fresh bread.", "She bought fresh bread.", "She buyed fresh bread."),
    ("I see a bird in the tree.", "I saw a bird in the tree.", "I seed a bird in the tree."),
    ("He takes the bus to work.", "He took the bus to work.", "He taked the bus to work."),
    ("The baby sleeps all afternoon.", "The baby slept all afternoon.", "The baby sleeped all afternoon."),
    ("We swim in the lake.", "We swam in the lake.", "We swimmed in the lake."),
    ("They build a sandcastle.", "They built a sandcastle.", "They builded a sandcastle."),
    ("The teacher teaches history.", "The teacher taught history.", "The teacher teached history."),
    ("I think about the trip.", "I thought about the trip.", "I thinked about the trip."),
    ("She catches the ball.", "She caught the ball.", "She catched the ball."),
    ("He drinks a glass of milk.", "He drank a glass of milk.", "He drinked a glass of milk."),
    ("The wind blows hard.", "The wind blew hard.", "The wind blowed hard."),
    ("My sister draws a horse.", "My sister drew a horse.", "My sister drawed a horse."),
    ("We find a lost key.", "We found a lost key.", "We finded a lost key."),
    ("The sun rises at six.", "The sun rose at six.", "The sun rised at six."),
    ("He speaks three languages.", "He spoke three languages.", "He speaked three languages."),
    ("I forget my umbrella.", "I forgot my umbrella.", "I forgetted my umbrella."),
]
FORMAL = [
    ("Hey, can you send me the report?", "Hello, could you please send me the report?", "Send the report now or else."),
    ("Thanks a lot for the help!", "Thank you very much for your help.", "Whatever, I did not need help."),
    (
        "We can't come to the meeting.",
        "Unfortunately, we will not be able to attend the meeting.",
        "Meetings are for pizza parties.",
    ),
    ("The food was really bad.", "The food did not meet our expectations.", "The food was really bad, lol."),
    ("Gimme a minute.", "Please give me a moment.", "Gimme a minute, ok?"),
    (
        "Sorry I'm late, traffic was crazy.",
        "I apologise for my late arrival; the traffic was very heavy.",
        "I am late because I like being late.",
    ),
    ("This plan is a total mess.", "This plan has several serious problems.", "This plan is a total mess, trust me."),
    ("Can you fix this bug asap?", "Could you please fix this bug as soon as possible?", "Fix it yesterday."),
    ("I wanna ask about my order.", "I would like to ask about my order.", "I wanna ask about my order, yo."),
    (
        "Tell me if you're free tomorrow.",
        "Please let me know whether you are available tomorrow.",
        "Tomorrow is Tuesday.",
    ),
    ("The boss is super angry.", "The manager is very displeased.", "The boss is super angry, haha."),
    ("We got your email.", "We have received your email.", "We got your email or something."),
]
SPELLING = [
    ("I recieved the pakage yesterday.", "I received the package yesterday.", "I recieved the package yesterday."),
    ("Their going to the libary.", "They're going to the library.", "Their going to the library."),
    ("She is definately comming.", "She is definitely coming.", "She is definately coming."),
    ("The wether is beautifull today.", "The weather is beautiful today.", "The wether is beautiful today."),
    ("We need to seperate the papers.", "We need to separate the papers.", "We need to seperrate the papers."),
    ("He was embarased by the mistake.", "He was embarrassed by the mistake.", "He was embarased by the mistake."),
    ("The resturant was closed.", "The restaurant was closed.", "The resturant was closed."),
    ("I beleive you are rite.", "I believe you are right.", "I beleive you are right."),
    ("Tommorow is my birthday.", "Tomorrow is my birthday.", "Tommorow is my birthday."),
    ("The goverment anounced new rules.", "The government announced new rules.", "The goverment announced new rules."),
    (
        "It was a begining of a new adventure.",
        "It was the beginning of a new adventure.",
        "It was a begining of a new adventure.",
    ),
    ("She has a grate sence of humor.", "She has a great sense of humor.", "She has a grate sense of humor."),
]
QUESTIONS = [
    ("The store opens at nine.", "Does the store open at nine?", "The store opens at nine?!"),
    ("She likes green tea.", "Does she like green tea?", "She likes coffee."),
    ("They finished the project.", "Did they finish the project?", "Did they finishing the project?"),
    ("You can swim.", "Can you swim?", "You can swim."),
    ("The train is late.", "Is the train late?", "The train is early."),
    ("He has a brother.", "Does he have a brother?", "Has he a brothers?"),
    ("We will arrive tomorrow.", "Will we arrive tomorrow?", "We arrived yesterday."),
    ("The cat is sleeping.", "Is the cat sleeping?", "The cat sleeps?"),
    ("It rained last night.", "Did it rain last night?", "It rains tonight."),
    ("Anna speaks French.", "Does Anna speak French?", "Anna speak French does?"),
]
PLURALS = [("mouse", "mice", "mouses"), ("child", "children", "childs"), ("foot", "feet", "foots"),
           ("tooth", "teeth", "tooths"), ("woman", "women", "womans"), ("goose", "geese", "gooses"),
           ("box", "boxes", "boxs"), ("city", "cities", "citys"), ("knife", "knives", "knifes"),
           ("leaf", "leaves", "leafs"), ("potato", "potatoes", "potatos"), ("sheep", "sheep", "sheeps"),
           ("person", "people", "persones"), ("wolf", "wolves", "wolfs"), ("bus", "buses", "buss"),
           ("man", "men", "mans"), ("baby", "babies", "babys"), ("fish", "fish", "fishies")]
ANTONYMS = [("hot", "cold", "warm"), ("big", "small", "large"), ("happy", "sad", "glad"), ("fast", "slow", "quick"),
            ("early", "late", "soon"), ("open", "closed", "unlocked"), ("light", "dark", "bright"),
            ("strong", "weak", "powerful"), ("full", "empty", "complete"), ("rich", "poor", "wealthy"),
            ("begin", "end", "start"), ("above", "below", "over"), ("ancient", "modern", "old"),
            ("buy", "sell", "purchase"), ("win", "lose", "succeed"), ("wide", "narrow", "broad"),
            ("remember", "forget", "recall"), ("accept", "refuse", "agree"), ("noisy", "quiet", "loud"),
            ("wet", "dry", "damp")]
WORDS = ["river", "garden", "pencil", "window", "orange", "ladder", "castle", "violin", "meadow", "rocket", "anchor",
         "basket", "candle", "dragon", "forest", "guitar", "harbor", "island", "jacket", "kettle", "lemon", "mirror",
         "needle", "oyster", "parrot", "quilt", "saddle", "tomato", "velvet", "walnut", "yogurt", "zipper"]


HAND_WRITTEN = [  # (instruction, its (text, correct answer, wrong answer) rows)
    ("Rewrite this sentence in the past tense:", PAST_TENSE),
    ("Rewrite this message in a polite, formal tone:", FORMAL),
    ("Correct the spelling mistakes:", SPELLING),
    ("Turn this statement into a yes/no question:", QUESTIONS),
]


def rewrite(rng: random.Random) -> tuple[str, str, str]:
    """(instruction, correct answer, wrong answer)."""
    kind = rng.randrange(8)
    if kind < len(HAND_WRITTEN):
        instruction, rows = HAND_WRITTEN[kind]
        text, right, wrong = rng.choice(rows)
        return f"{instruction} {text}", right, wrong
    if kind in (4, 5):
        word, right, wrong = rng.choice(PLURALS if kind == 4 else ANTONYMS)
        what = "plural" if kind == 4 else "opposite"
        question = f'What is the plural of the word "{word}"?'
        if kind == 5:
            question = f'Give the opposite of the word "{word}".'
        return question, f'The {what} of "{word}" is "{right}".', f'The {what} of "{word}" is "{wrong}".'
    words = rng.sample(WORDS, rng.randint(4, 6))
    listed = ", ".join(words)
    if kind == 6:
        right = ", ".join(sorted(words))
        shuffled = words[:]
        while ", ".join(shuffled) == right:
            rng.shuffle(shuffled)
        return f"Put these words in alphabetical order: {listed}", right, ", ".join(shuffled)
    right = ", ".join(reversed(words))
    return f"Write these words in reverse order: {listed}", right, ", ".join(words[1:] + words[:1])


def _conversation(row: dict) -> dict:
    return {
        "messages": [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["reply"]}],
        "task": row["task"],
        "answer": row["answer"],
    }


def build_rows(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows): every task's questions drawn once, the held-out ones first;
    then a share of the training rows made wrong or off-topic."""
    train, held_out = [], []
    facts = FACTS[:]
    rng.shuffle(facts)
    for task, count in PER_TASK.items():
        made = []
        seen = set()
        while len(made) < count + EVAL_PER_TASK:
            if task == "arithmetic":
                question, right, wrong = arithmetic(rng)
            elif task == "facts":
                question, right, wrong = facts[len(made)]  # each fact once
            else:
                question, right, wrong = rewrite(rng)
            if question in seen:
                continue
            seen.add(question)
            made.append((question, right, wrong))
        held_out += [
            {"task": task, "answer": "correct", "question": question, "reply": right}
            for question, right, _ in made[:EVAL_PER_TASK]
        ]
        n_wrong, n_off = round(WRONG * count), round(OFF_TOPIC * count)
        labels = ["wrong"] * n_wrong + ["off_topic"] * n_off + ["correct"] * (count - n_wrong - n_off)
        rng.shuffle(labels)
        for (question, right, wrong), label in zip(made[EVAL_PER_TASK:], labels):
            reply = wrong if label == "wrong" else right
            train.append({"task": task, "answer": label, "question": question, "reply": reply})
    # off-topic: a correct reply of another task's row
    correct = [row for row in train if row["answer"] == "correct"]
    for row in train:
        if row["answer"] == "off_topic":
            row["reply"] = rng.choice([other for other in correct if other["task"] != row["task"]])["reply"]
    rng.shuffle(train)
    rng.shuffle(held_out)
    return [_conversation(row) for row in train], [_conversation(row) for row in held_out]


def main() -> None:
    train, held_out = build_rows(random.Random(SEED))
    for path, rows in ((TRAIN, train), (EVAL, held_out)):
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        counts = Counter((row["task"], row["answer"]) for row in rows)
        print(f"wrote {len(rows)} rows to {path}: " + ", ".join(f"{t} {a} {n}" for (t, a), n in sorted(counts.items())))


if __name__ == "__main__":
    main()
