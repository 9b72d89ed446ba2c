"""Write the DPO demo's preference pairs: train/data/preferences.jsonl (train) and preferences_eval.jsonl (held out).

Every pair answers a short factual question correctly twice; the preference is a house style the base model does
not have: the chosen answer ends with the sign-off "Happy to help!", the rejected one stops after the fact. The
base chat model gives the plain answer the higher log-probability on every pair, so the held-out preference
accuracy starts at 0 and shows what DPO moved; since both answers are good English, pushing the rejected one down
does not teach the model to avoid normal answers (a pirate-speak preference, tried first, did: with the plain
answer as the rejected side, DPO broke the model's English). The held-out questions are about other facts than
the training ones. Deterministic: rerunning rewrites the same files.

    python train/data/make_preferences.py
"""

import json
import random
from pathlib import Path

FACTS = [  # (question, plain answer)
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("What is the capital of Egypt?", "The capital of Egypt is Cairo."),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa."),
    ("What is the capital of Kenya?", "The capital of Kenya is Nairobi."),
    ("What is the capital of Peru?", "The capital of Peru is Lima."),
    ("What is the capital of Norway?", "The capital of Norway is Oslo."),
    ("What is the capital of Greece?", "The capital of Greece is Athens."),
    ("What is the capital of Portugal?", "The capital of Portugal is Lisbon."),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    ("What color are ripe bananas?", "Ripe bananas are yellow."),
    ("What color is grass?", "Grass is green."),
    ("What color is snow?", "Snow is white."),
    ("What color is coal?", "Coal is black."),
    ("What color are most strawberries?", "Most strawberries are red."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("How many legs does a dog have?", "A dog has four legs."),
    ("How many legs does a bird have?", "A bird has two legs."),
    ("How many wheels does a bicycle have?", "A bicycle has two wheels."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("How many months are in a year?", "There are twelve months in a year."),
    ("How many hours are in a day?", "There are twenty-four hours in a day."),
    ("How many minutes are in an hour?", "There are sixty minutes in an hour."),
    ("What is two plus two?", "Two plus two is four."),
    ("What is three times three?", "Three times three is nine."),
    ("What is ten minus four?", "Ten minus four is six."),
    ("What is half of ten?", "Half of ten is five."),
    ("What do bees make?", "Bees make honey."),
    ("What do cows drink?", "Cows drink water."),
    ("Where do fish live?", "Fish live in water."),
    ("What animal says moo?", "A cow says moo."),
    ("What animal barks?", "A dog barks."),
    ("What is the largest ocean?", "The largest ocean is the Pacific Ocean."),
    ("What is the largest planet?", "The largest planet is Jupiter."),
    ("Which planet is called the red planet?", "Mars is called the red planet."),
    ("What gas do plants take in?", "Plants take in carbon dioxide."),
    ("What do we breathe to live?", "We breathe oxygen to live."),
    ("At what temperature does water freeze in Celsius?", "Water freezes at zero degrees Celsius."),
    ("At what temperature does water boil in Celsius?", "Water boils at one hundred degrees Celsius."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("What is the opposite of up?", "The opposite of up is down."),
    ("What season comes after winter?", "Spring comes after winter."),
    ("What season comes after summer?", "Autumn comes after summer."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What language is spoken in Brazil?", "Portuguese is spoken in Brazil."),
    ("What language is spoken in Mexico?", "Spanish is spoken in Mexico."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("What is the closest star to Earth?", "The closest star to Earth is the Sun."),
    ("What does a thermometer measure?", "A thermometer measures temperature."),
    ("What tool do you use to cut paper?", "You use scissors to cut paper."),
    ("What do you call a baby cat?", "A baby cat is called a kitten."),
    ("What do you call a baby dog?", "A baby dog is called a puppy."),
    ("What is the main ingredient of bread?", "The main ingredient of bread is flour."),
    ("Which continent is Egypt in?", "Egypt is in Africa."),
    ("Which continent is France in?", "France is in Europe."),
    ("How many sides does a triangle have?", "A triangle has three sides."),
    ("How many sides does a square have?", "A square has four sides."),
    ("What is the capital of Australia?", "The capital of Australia is Canberra."),
    ("What is the capital of Ireland?", "The capital of Ireland is Dublin."),
    ("What color is a lemon?", "A lemon is yellow."),
    ("How many legs does a cat have?", "A cat has four legs."),
    ("How many seconds are in a minute?", "There are sixty seconds in a minute."),
    ("What is five plus five?", "Five plus five is ten."),
    ("What animal says meow?", "A cat says meow."),
    ("Which planet do we live on?", "We live on Earth."),
    ("What is the opposite of light?", "The opposite of light is dark."),
    ("What season comes after spring?", "Summer comes after spring."),
    ("What language is spoken in France?", "French is spoken in France."),
    ("What do you call a baby cow?", "A baby cow is called a calf."),
    ("How many sides does a hexagon have?", "A hexagon has six sides."),
    ("Which continent is Japan in?", "Japan is in Asia."),
    ("What do caterpillars turn into?", "Caterpillars turn into butterflies."),
    ("What is the fastest land animal?", "The fastest land animal is the cheetah."),
]
N_EVAL = 16  # the last facts are held out


SIGN_OFF = "Happy to help!"


def main():
    out = Path(__file__).resolve().parent
    rng = random.Random(0)
    facts = list(FACTS)
    train, held = facts[:-N_EVAL], facts[-N_EVAL:]
    rng.shuffle(train)
    for name, rows in (("preferences.jsonl", train), ("preferences_eval.jsonl", held)):
        lines = [json.dumps({"prompt": q, "chosen": f"{a} {SIGN_OFF}", "rejected": a}) for q, a in rows]
        (out / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"wrote {out / name}: {len(lines)} pairs")


if __name__ == "__main__":
    main()
